#!/usr/bin/env bash
# Start N tritonserver replicas of one model repository (rmt-triton, python backend) and
# nginx in front of them (deploy/nginx/rmt-triton.conf), all on 127.0.0.1:
#   scripts/triton_replicas.sh REPO RUN_DIR BALANCER_PORT REPLICA_PORT [REPLICA_PORT...]
# RUN_DIR (created; must be empty or absent) gets the filled nginx.conf, the logs, one
# replica-PORT.pid per replica and, once every replica and the balancer answer, "ready".
# Runs in the foreground until SIGINT/SIGTERM or nginx exits, then stops everything it
# started. A replica that dies is not restarted (the balancer skips it).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 4 ]; then
    echo "usage: $0 REPO RUN_DIR BALANCER_PORT REPLICA_PORT [REPLICA_PORT...]" >&2
    exit 2
fi
REPO=$1 RUN=$2 LISTEN=$3
shift 3
if ! command -v nginx >/dev/null; then
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

SERVERS=""
for PORT in "$@"; do
    bash "$ROOT/scripts/triton_serve.sh" "$REPO" --http-port "$PORT" --http-address 127.0.0.1 \
        --allow-grpc false --allow-metrics false --exit-timeout-secs 1 \
        >"$RUN/replica-$PORT.log" 2>&1 &
    PIDS+=($!)
    echo $! >"$RUN/replica-$PORT.pid"
    SERVERS+="        server 127.0.0.1:$PORT max_fails=1 fail_timeout=2s;"$'\n'
done

ready() {  # ready URL: the server or balancer says it is ready
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
        "$1/v2/health/ready" 2>/dev/null
}
for PORT in "$@"; do
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
sed -e "s|@RUN@|$RUN|g" -e "s|@USER@|$USER_LINE|" -e "s|@LISTEN@|127.0.0.1:$LISTEN|" \
    "$ROOT/deploy/nginx/rmt-triton.conf" | awk -v servers="$SERVERS" \
    '/^@SERVERS@$/ { printf "%s", servers; next } { print }' >"$RUN/nginx.conf"
nginx -t -q -p "$RUN" -e "$RUN/nginx-error.log" -c "$RUN/nginx.conf"
nginx -p "$RUN" -e "$RUN/nginx-error.log" -c "$RUN/nginx.conf" &
NGINX=$!
for _ in $(seq 100); do
    ready "http://127.0.0.1:$LISTEN" && break
    sleep 0.1
done
ready "http://127.0.0.1:$LISTEN" || { echo "$0: nginx did not start; see $RUN/nginx-error.log" >&2; exit 1; }
touch "$RUN/ready"
echo "triton_replicas.sh: $# replicas behind http://127.0.0.1:$LISTEN (logs in $RUN)"
wait "$NGINX"
