"""Opening a model by path: what the file is decides the backend it can run on."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

from rmt_deploy.contract import STEP
from rmt_deploy.errors import BackendError, ManifestError
from rmt_deploy.manifest import MANIFEST_NAME, Manifest, read_manifest
from rmt_deploy.runtime.backends.base import StepEngine, precision_graphs
from rmt_deploy.runtime.model import RMTModel
from rmt_deploy.runtime.options import RuntimeOptions
from rmt_deploy.runtime.selection import BackendChoice, choose_backend
from rmt_deploy.runtime.tokens import manifest_tokenizer, plain_tokenizer

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def open_model(path: str | Path, options: RuntimeOptions | None = None,
               **overrides: Any) -> RMTModel:
    """Open an export folder, its ONNX graph or TensorRT plan, or a checkpoint (reference
    backend). ``options`` (or its fields as keywords: ``backend``, ``precision``,
    ``threads``, ``cuda_graphs``, ``fusions``, ``hint``, ``measure``) say how. Without a
    backend, an export runs on TensorRT where it has plans and TensorRT is installed, else
    on ONNX Runtime with its defaults, unless ``measure`` asks ``runtime.selection`` to
    choose (``"auto"``: the cached choice, else the CPU backend measured fastest for it on
    this host, cached in the user's cache folder; ``"again"``: measured anew), which
    keeps ONNX Runtime for large weights and on CUDA; ``model.choice`` says which and why.
    """
    try:
        options = dataclasses.replace(options or RuntimeOptions(), **overrides)
    except TypeError as error:
        raise BackendError(f"open_model: {error}; see RuntimeOptions") from None
    path = Path(path)
    if not path.exists():
        if path.suffix == ".plan":
            raise BackendError(f"{path}: no such TensorRT plan; plans are built by rmt-export "
                               "--engine on a host with TensorRT and an NVIDIA GPU (or pass "
                               "the export folder to run its ONNX graphs)")
        raise BackendError(f"{path}: no such file or folder; pass an export folder, "
                           "model.onnx or a checkpoint")
    if path.suffix == ".plan":
        if options.backend not in (None, "tensorrt"):
            raise BackendError(f"{path}: a TensorRT plan runs on the tensorrt backend; pass "
                               f"the export folder to use {options.backend}")
        return _open_export(path, dataclasses.replace(options, backend="tensorrt"))
    if path.is_dir() or path.suffix == ".onnx":
        return _open_export(path, options)
    if path.suffix in CHECKPOINT_SUFFIXES:
        return _open_checkpoint(path, options)
    raise BackendError(f"{path}: not a model rmt-run knows (expected an export folder, "
                       f"model.onnx, or a checkpoint {'/'.join(CHECKPOINT_SUFFIXES)})")


def _open_export(path: Path, options: RuntimeOptions) -> RMTModel:
    folder = path if path.is_dir() else path.parent
    if not (folder / MANIFEST_NAME).is_file():
        raise ManifestError(f"{path}: no {MANIFEST_NAME} beside it, so it is not an "
                            "rmt-export folder; export the checkpoint with rmt-export")
    manifest = read_manifest(folder)
    if path.suffix == ".onnx" and manifest.path(manifest.graphs[STEP].file) != path:
        raise ManifestError(f"{path}: not the step graph listed in {folder / MANIFEST_NAME}; "
                            "pass the export folder")
    if path.suffix == ".plan" and (STEP not in manifest.engines or manifest.path(
            manifest.engines[STEP]["file"]) != path):
        raise ManifestError(f"{path}: not the plan listed in {folder / MANIFEST_NAME}; "
                            "rebuild it with rmt-export --engine")
    if options.backend == "torch":
        raise BackendError("the torch backend runs checkpoints; pass the checkpoint file")
    tokenizer = manifest_tokenizer(manifest)
    _check_tokenizer(tokenizer, manifest)
    if options.backend is None and not (manifest.engines and importlib.util.find_spec(
            "tensorrt")):
        precision_graphs(manifest, options.precision)  # once, not once per candidate
        choice, engine = choose_backend(manifest, options,
                                        lambda chosen: _engine(manifest, chosen))
    else:
        backend = options.backend or "tensorrt"
        choice = BackendChoice(backend, "requested" if options.backend else
                               "TensorRT plans, and TensorRT installed", options.threads,
                               options.fusions, options.hint)
        engine = _engine(manifest, dataclasses.replace(options, backend=backend,
                                                       measure="off"))
    return RMTModel(engine, manifest.load_initial_state(), tokenizer, description=str(folder),
                    choice=choice, identity=manifest.identity())


def _engine(manifest: Manifest, options: RuntimeOptions) -> StepEngine:
    if options.backend == "tensorrt":
        from rmt_deploy.runtime.backends.tensorrt import TensorRTEngine

        return TensorRTEngine(manifest, options)
    if options.backend == "openvino":
        from rmt_deploy.runtime.backends.openvino import OpenVinoEngine

        return OpenVinoEngine(manifest, options)
    from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine

    return OnnxRuntimeEngine(manifest, options)


def _check_tokenizer(tokenizer: Any, manifest: Manifest) -> None:
    """A tokenizer that makes ids past the model's vocabulary belongs to another model."""
    if tokenizer is None:
        return
    size = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    if size > manifest.config.vocab_size:
        raise ManifestError(f"{manifest.path(manifest.tokenizer['file'])}: the tokenizer has "
                            f"{size} ids, the model's vocabulary {manifest.config.vocab_size}; "
                            "it belongs to another model: re-export")


def _open_checkpoint(path: Path, options: RuntimeOptions) -> RMTModel:
    if options.backend not in (None, "torch"):
        raise BackendError(f"a checkpoint runs on the torch backend; export it with "
                           f"rmt-export to use {options.backend}")
    from tokenizers import Tokenizer

    from rmt_deploy.model.checkpoint import load_checkpoint
    from rmt_deploy.runtime.backends.torch import TorchEngine

    loaded = load_checkpoint(path)
    engine = TorchEngine(loaded.rmt, threads=options.threads)
    tokenizer = (plain_tokenizer(Tokenizer.from_str(loaded.tokenizer_json))
                 if loaded.tokenizer_json else None)
    return RMTModel(engine, engine.initial_state(), tokenizer, description=str(path),
                    choice=BackendChoice("torch", "a checkpoint runs on the reference backend",
                                         options.threads), identity=loaded.sha256)
