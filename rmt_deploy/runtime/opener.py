"""Opening a model by path: what the file is decides the backend it can run on."""

from __future__ import annotations

from pathlib import Path

from rmt_deploy.errors import BackendError, ManifestError
from rmt_deploy.manifest import MANIFEST_NAME, STEP_GRAPH, read_manifest
from rmt_deploy.runtime.model import RMTModel
from rmt_deploy.runtime.tokens import manifest_tokenizer, plain_tokenizer

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
EXPORT_BACKENDS = ("onnxruntime", "openvino", "tensorrt")
BACKENDS = (*EXPORT_BACKENDS, "torch")


def open_model(path: str | Path, backend: str | None = None, threads: int | None = None,
               cuda_graphs: bool = False, precision: str = "fp32") -> RMTModel:
    """Open an export folder, its ONNX graph or TensorRT plan, or a checkpoint (reference
    backend). ``backend`` defaults to the fastest one available for the model;
    ``cuda_graphs`` lets the TensorRT backend replay captured CUDA graphs; ``precision``
    picks the export's fp32, fp16 or int8 graphs for the ONNX backends.
    """
    path = Path(path)
    if backend is not None and backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not path.exists():
        raise BackendError(f"{path}: no such file or folder; pass an export folder, "
                           "model.onnx or a checkpoint")
    if path.suffix == ".plan":
        if backend not in (None, "tensorrt"):
            raise BackendError(f"{path}: a TensorRT plan runs on the tensorrt backend; pass "
                               f"the export folder to use {backend}")
        return _open_export(path, "tensorrt", threads, cuda_graphs, precision)
    if path.is_dir() or path.suffix == ".onnx":
        return _open_export(path, backend, threads, cuda_graphs, precision)
    if path.suffix in CHECKPOINT_SUFFIXES:
        return _open_checkpoint(path, backend, threads)
    raise BackendError(f"{path}: not a model rmt-run knows (expected an export folder, "
                       f"model.onnx, or a checkpoint {'/'.join(CHECKPOINT_SUFFIXES)})")


def _open_export(path: Path, backend: str | None, threads: int | None,
                 cuda_graphs: bool, precision: str) -> RMTModel:
    folder = path if path.is_dir() else path.parent
    if not (folder / MANIFEST_NAME).is_file():
        raise ManifestError(f"{path}: no {MANIFEST_NAME} beside it, so it is not an "
                            "rmt-export folder; export the checkpoint with rmt-export")
    manifest = read_manifest(folder)
    if path.suffix == ".onnx" and manifest.path(manifest.graphs[STEP_GRAPH].file) != path:
        raise ManifestError(f"{path}: not the step graph listed in {folder / MANIFEST_NAME}; "
                            "pass the export folder")
    if path.suffix == ".plan" and (STEP_GRAPH not in manifest.engines or manifest.path(
            manifest.engines[STEP_GRAPH]["file"]) != path):
        raise ManifestError(f"{path}: not the plan listed in {folder / MANIFEST_NAME}; "
                            "rebuild it with rmt-export --engine")
    backend = backend or ("tensorrt" if manifest.engines and _has_tensorrt() else "onnxruntime")
    if backend == "torch":
        raise BackendError("the torch backend runs checkpoints; pass the checkpoint file")
    if backend == "tensorrt":
        from rmt_deploy.runtime.backends.tensorrt import TensorRTEngine

        engine = TensorRTEngine(manifest, cuda_graphs=cuda_graphs)
    elif backend == "openvino":
        from rmt_deploy.runtime.backends.openvino import OpenVinoEngine

        engine = OpenVinoEngine(manifest, threads=threads, graphs=precision)
    else:
        from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine

        engine = OnnxRuntimeEngine(manifest, threads=threads, precision=precision)
    return RMTModel(engine, manifest.load_initial_memory(), manifest_tokenizer(manifest),
                    description=str(folder))


def _has_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def _open_checkpoint(path: Path, backend: str | None, threads: int | None) -> RMTModel:
    if backend not in (None, "torch"):
        raise BackendError(f"a checkpoint runs on the torch backend; export it with "
                           f"rmt-export to use {backend}")
    from tokenizers import Tokenizer

    from rmt_deploy.model.checkpoint import load_checkpoint
    from rmt_deploy.runtime.backends.torch import TorchEngine

    loaded = load_checkpoint(path)
    engine = TorchEngine(loaded.rmt, threads=threads)
    tokenizer = (plain_tokenizer(Tokenizer.from_str(loaded.tokenizer_json))
                 if loaded.tokenizer_json else None)
    return RMTModel(engine, engine.initial_memory(), tokenizer, description=str(path))
