#!/usr/bin/env bash
# Start N tritonserver replicas of one model repository (rmt-triton, python backend) and
# nginx in front of them (deploy/nginx/rmt-triton.conf), all on 127.0.0.1:
#   scripts/triton_replicas.sh REPO RUN_DIR BALANCER_PORT REPLICA_PORT [REPLICA_PORT...]
# Each port is HTTP, or HTTP:GRPC to serve gRPC too (the balancer's and every replica's).
# RUN_DIR (created; must be empty or absent) gets the filled nginx.conf, the logs, one
# replica-PORT.pid per replica and, once every replica and the balancer answer, "ready".
# Runs in the foreground until SIGINT/SIGTERM or nginx exits, then stops everything it
# started. A replica that dies is not restarted (the balancer skips it).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 4 ]; then
    echo "usage: $0 REPO RUN_DIR BALANCER_PORT REPLICA_PORT [REPLICA_PORT...] (each HTTP or HTTP:GRPC)" >&2
    exit 2
fi
REPO=$1 RUN=$2 LISTEN=${3%%:*}
GRPC_LISTEN=""
[[ $3 == *:* ]] && GRPC_LISTEN=${3#*:}
shift 3
for SPEC in "$@"; do
    if [ -n "$GRPC_LISTEN" ] && [[ $SPEC != *:* ]]; then
        echo "$0: the balancer serves gRPC ($GRPC_LISTEN) but replica $SPEC has no gRPC port; pass HTTP:GRPC" >&2
        exit 2
    fi
done
# Debian puts nginx in /usr/sbin, which is not on a regular user's PATH.
NGINX=$(command -v nginx || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true)
if [ -z "$NGINX" ]; then
    echo "$0: nginx is not installed; run bash scripts/setup_triton.sh (apt-get install nginx-light)" >&2
    exit 1
fi
if [ -e "$RUN" ] && [ -n "$(ls -A "$RUN")" ]; then
    echo "$0: $RUN is not empty; pass a new folder for this run" >&2
    exit 1
fi
mkdir -p "$RUN/temp"
RUN=$(cd "$RUN" && pwd)
PIDS=()
stop() {
    trap - INT TERM EXIT
    [ -f "$RUN/nginx.pid" ] && kill -TERM "$(cat "$RUN/nginx.pid")" 2>/dev/null || true
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait || true
}
trap 'stop; exit 0' INT TERM  # a requested stop is a clean exit
trap stop EXIT

SERVERS="" GRPC_SERVERS="" PORTS=()
for SPEC in "$@"; do
    PORT=${SPEC%%:*}
    PORTS+=("$PORT")
    if [ -n "$GRPC_LISTEN" ]; then
        GRPC=(--grpc-port "${SPEC#*:}" --grpc-address 127.0.0.1)
        GRPC_SERVERS+="        server 127.0.0.1:${SPEC#*:} max_fails=1 fail_timeout=2s;"$'\n'
    else
        GRPC=(--allow-grpc false)
    fi
    bash "$ROOT/scripts/triton_serve.sh" "$REPO" --http-port "$PORT" --http-address 127.0.0.1 \
        "${GRPC[@]}" --allow-metrics false --exit-timeout-secs 1 \
        >"$RUN/replica-$PORT.log" 2>&1 &
    PIDS+=($!)
    echo $! >"$RUN/replica-$PORT.pid"
    SERVERS+="        server 127.0.0.1:$PORT max_fails=1 fail_timeout=2s;"$'\n'
done

ready() {  # ready URL: the server or balancer says it is ready
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
        "$1/v2/health/ready" 2>/dev/null
}
for PORT in "${PORTS[@]}"; do
    for _ in $(seq 600); do
        ready "http://127.0.0.1:$PORT" && break
        sleep 0.2
    done
    ready "http://127.0.0.1:$PORT" || {
        echo "$0: replica on port $PORT did not get ready; see $RUN/replica-$PORT.log" >&2
        exit 1
    }
done

USER_LINE=""
[ "$(id -u)" = 0 ] && USER_LINE="user $(id -un);"
# The gRPC block is the template's "#GRPC " lines, put where @GRPC@ stands if asked for.
sed -e "s|@RUN@|$RUN|g" -e "s|@USER@|$USER_LINE|" -e "s|@LISTEN@|127.0.0.1:$LISTEN|" \
    "$ROOT/deploy/nginx/rmt-triton.conf" | awk -v servers="$SERVERS" \
    -v grpc_servers="$GRPC_SERVERS" -v grpc_listen="${GRPC_LISTEN:+127.0.0.1:$GRPC_LISTEN}" '
    /^#GRPC / {
        line = substr($0, 7)
        if (line ~ /@GRPC_SERVERS@/) { block = block grpc_servers; next }
        gsub(/@GRPC_LISTEN@/, grpc_listen, line)
        block = block line "\n"
        next
    }
    { lines[++count] = $0 }
    END {
        for (i = 1; i <= count; i++) {
            if (lines[i] == "@SERVERS@") printf "%s", servers
            else if (lines[i] == "@GRPC@") { if (grpc_listen != "") printf "%s", block }
            else print lines[i]
        }
    }' >"$RUN/nginx.conf"
"$NGINX" -t -q -p "$RUN" -e "$RUN/nginx-error.log" -c "$RUN/nginx.conf"
"$NGINX" -p "$RUN" -e "$RUN/nginx-error.log" -c "$RUN/nginx.conf" &
NGINX_PID=$!
for _ in $(seq 100); do
    ready "http://127.0.0.1:$LISTEN" && break
    sleep 0.1
done
ready "http://127.0.0.1:$LISTEN" || { echo "$0: nginx did not start; see $RUN/nginx-error.log" >&2; exit 1; }
touch "$RUN/ready"
echo "triton_replicas.sh: $# replicas behind http://127.0.0.1:$LISTEN${GRPC_LISTEN:+ and grpc://127.0.0.1:$GRPC_LISTEN} (logs in $RUN)"
wait "$NGINX_PID"
