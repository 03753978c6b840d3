#!/usr/bin/env bash
# The NGC check, for a machine with Docker and NVIDIA's Triton container (GPU optional for
# the onnxruntime backend, required for tensorrt): serve an export with Triton's
# onnxruntime backend (and its TensorRT plan, where rmt-export --engine built one) using
# implicit state for the memory, stream the input through rmt-triton-run, compare the
# answer with rmt-run, then measure 16 concurrent sequences (scripts/triton_measure.py).
#
#   bash scripts/triton_ngc_check.sh [EXPORT] [INPUT]
#   defaults: out/demo-export out/demo-input/sample_00000.txt (from scripts/demo.sh)
#   TRITON_IMAGE (nvcr.io/nvidia/tritonserver:25.10-py3), TRITON_PORT (8000, HTTP: health),
#   TRITON_GRPC_PORT (8001: the client),
#   RMT_VENV (.venv: rmt-deploy with the serving extra)
set -euo pipefail
cd "$(dirname "$0")/.."
EXPORT=${1:-out/demo-export}
INPUT=${2:-out/demo-input/sample_00000.txt}
IMAGE=${TRITON_IMAGE:-nvcr.io/nvidia/tritonserver:25.10-py3}
PORT=${TRITON_PORT:-8000}
GRPC_PORT=${TRITON_GRPC_PORT:-8001}
BIN=${RMT_VENV:-.venv}/bin
WORK=$(mktemp -d)
REPO=$WORK/repo

"$BIN/rmt-triton" "$REPO" --model "$EXPORT" --name rmt_onnx --backend onnxruntime
MODELS=(rmt_onnx)
if "$BIN/python" -c 'import json, sys; sys.exit("step" not in json.load(open(sys.argv[1])).get("engines", {}))' \
        "$EXPORT/rmt.json"; then
    "$BIN/rmt-triton" "$REPO" --model "$EXPORT" --name rmt_trt --backend tensorrt --max-batch-size 8
    MODELS+=(rmt_trt)
fi

GPU=()
if command -v nvidia-smi >/dev/null 2>&1; then GPU=(--gpus all); fi
CONTAINER=$(docker run -d --rm "${GPU[@]}" -p "127.0.0.1:$PORT:8000" \
    -p "127.0.0.1:$GRPC_PORT:8001" -v "$REPO:/models:ro" \
    "$IMAGE" tritonserver --model-repository=/models)
trap 'docker logs "$CONTAINER" > "$WORK/triton.log" 2>&1 || true; docker stop "$CONTAINER" >/dev/null || true' EXIT
for _ in $(seq 240); do
    if curl -sf "127.0.0.1:$PORT/v2/health/ready" >/dev/null; then break; fi
    sleep 0.5
done
curl -sf "127.0.0.1:$PORT/v2/health/ready" >/dev/null || {
    docker logs "$CONTAINER" | tail -40; echo "triton_ngc_check: server not ready" >&2; exit 1; }

"$BIN/rmt-run" "$EXPORT" "$INPUT" --json > "$WORK/local.json"
for model in "${MODELS[@]}"; do
    "$BIN/rmt-triton-run" "$INPUT" --model "$EXPORT" --url "127.0.0.1:$GRPC_PORT" --name "$model" \
        --json > "$WORK/$model.json"
    "$BIN/python" - "$WORK/local.json" "$WORK/$model.json" "$model" <<'PY'
import json, sys

local, served = (json.load(open(path)) for path in sys.argv[1:3])
difference = max(abs(a - b) for a, b in zip(local["logits"], served["logits"]))
same = local["label"] == served["label"] and local["segments"] == served["segments"]
print(json.dumps({"model": sys.argv[3], "label": served["label"], "rmt_run_label": local["label"],
                  "segments": served["segments"], "max_logit_difference": difference,
                  "seconds": served["seconds"], "rmt_run_seconds": local["seconds"]}))
sys.exit(0 if same else f"triton_ngc_check: {sys.argv[3]} answers differently from rmt-run")
PY
    "$BIN/python" scripts/triton_measure.py --model "$EXPORT" --url "127.0.0.1:$GRPC_PORT" \
        --name "$model"
done
echo "triton_ngc_check: ${MODELS[*]} agree with rmt-run"
