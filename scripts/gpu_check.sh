#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU (TensorRT optional), print one JSON
# report of TensorRT / FP16 parity, drift, accuracy and speed. Needs rmt-deploy with its
# export extra and CUDA PyTorch installed (e.g. the GPU image from the Dockerfile).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_check.py "$@"
