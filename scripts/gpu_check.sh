#!/usr/bin/env bash
# The GPU check: one command, one JSON report on stdout (progress on stderr), exit status
# 1 when any gate fails. Needs rmt-deploy with its export extra and CUDA PyTorch (e.g. the
# GPU image from the Dockerfile); TensorRT and onnxruntime-gpu are checked where installed.
# --cpu: a dry run of the same code on the CPU. See benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
exec "$PYTHON" benchmarks/gpu_check.py "$@"
