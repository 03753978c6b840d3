# rmt-deploy GPU image: TensorRT (from NVIDIA's TensorRT container), onnxruntime-gpu,
# cuda-python and rmt-deploy.
#
#   docker build -t rmt-deploy:gpu .
#   docker run --rm --gpus all -v "$PWD:/work" rmt-deploy:gpu export /work/model.pt --engine
#   docker run --rm --gpus all -v "$PWD:/work" rmt-deploy:gpu run /work/model-export/model.plan /work/long.txt
#   docker run --rm --gpus all -v "$PWD:/work" rmt-deploy:gpu compare /work/model.pt /work/model-export/model.plan
#
# Pick a base whose TensorRT matches where the plans will run (plans are tied to the
# TensorRT version and GPU they were built on; rmt-run refuses others with a clear error).
ARG BASE=nvcr.io/nvidia/tensorrt:25.10-py3
FROM ${BASE}

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/rmt-deploy
COPY pyproject.toml README.md ./
COPY rmt_deploy ./rmt_deploy
COPY docker/entrypoint.sh /usr/local/bin/rmt-entrypoint

# torch for exporting (CUDA build from PyTorch's index), then rmt-deploy; ONNX Runtime's
# CPU wheel is swapped for the GPU one (both install the same module).
RUN python -m pip install --upgrade pip \
 && python -m pip install torch --index-url https://download.pytorch.org/whl/cu128 \
 && python -m pip install ".[export,serving,plot]" cuda-python \
 && python -m pip uninstall -y onnxruntime \
 && python -m pip install onnxruntime-gpu \
 && python -c "import tensorrt, onnxruntime, rmt_deploy; print('tensorrt', tensorrt.__version__, onnxruntime.get_available_providers())"

WORKDIR /work
ENTRYPOINT ["rmt-entrypoint"]
CMD ["run", "--help"]
