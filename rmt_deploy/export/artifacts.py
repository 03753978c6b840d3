"""Any artifact of a model opened as a step engine, for comparisons: a checkpoint (own
format or the authors', on the PyTorch reference), an export folder, one of its step
graphs (``model.onnx``, ``model.fp16.onnx``, ``model.int8.onnx``: the precision follows
the file) or its TensorRT plan."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from rmt_deploy.contract import STEP
from rmt_deploy.errors import ConfigError, ManifestError, RmtError
from rmt_deploy.manifest import MANIFEST_NAME, read_manifest, split_key
from rmt_deploy.runtime.backends.base import State, StepEngine
from rmt_deploy.runtime.opener import CHECKPOINT_SUFFIXES, open_model
from rmt_deploy.spec import RMTConfig

if TYPE_CHECKING:
    from rmt_deploy.model.checkpoint import AuthorsOptions


@dataclass
class Artifact:
    """An opened artifact: its engine, initial state (one row's) and a short description."""

    path: Path
    engine: StepEngine
    initial_state: State

    @property
    def config(self) -> RMTConfig:
        return self.engine.config

    @property
    def label(self) -> str:
        """``name (backend precision)``, e.g. ``model.fp16.onnx (onnxruntime fp16)``."""
        return f"{self.path.name} ({self.engine.name} {self.engine.precision})"


def open_artifact(path: str | Path, authors: AuthorsOptions | None = None,
                  backend: str | None = None, threads: int | None = None) -> Artifact:
    """Open ``path`` as :class:`Artifact`; ``authors`` reads an authors' checkpoint,
    ``backend`` (default onnxruntime, not measured: a comparison runs what it names) runs
    an export folder or graph; a checkpoint runs on torch, a plan on TensorRT."""
    path = Path(path)
    if not path.exists():
        raise RmtError(f"{path}: no such file or folder; pass a checkpoint, an export folder, "
                       "its model.onnx (or .fp16/.int8.onnx) or its model.plan")
    if path.suffix in CHECKPOINT_SUFFIXES:
        from rmt_deploy.model.checkpoint import load_checkpoint
        from rmt_deploy.runtime.backends.torch import TorchEngine

        engine = TorchEngine(load_checkpoint(path, authors).rmt, threads=threads)
        return Artifact(path, engine, engine.initial_state())
    target, precision, backend = path, "fp32", backend or "onnxruntime"
    if path.suffix == ".onnx":
        target, precision = path.parent, _graph_precision(path)
    elif path.suffix == ".plan":
        backend = "tensorrt"
    model = open_model(target, backend=backend, precision=precision, threads=threads)
    return Artifact(path, model.engine, model.initial_state)


def _graph_precision(path: Path) -> str:
    """The precision of the step graph ``path`` of an export folder."""
    if not (path.parent / MANIFEST_NAME).is_file():
        raise ManifestError(f"{path}: no {MANIFEST_NAME} beside it, so it is not an "
                            "rmt-export folder; export the checkpoint with rmt-export")
    manifest = read_manifest(path.parent)
    for key, spec in manifest.graphs.items():
        graph, precision = split_key(key)
        if manifest.path(spec.file) == path and graph == STEP:
            return precision
    steps = sorted(spec.file for key, spec in manifest.graphs.items()
                   if split_key(key)[0] == STEP)
    raise ManifestError(f"{path}: not a step graph of {path.parent / MANIFEST_NAME}; pass one "
                        f"of {', '.join(steps)} or the export folder")


def check_same_model(reference: Artifact, candidate: Artifact) -> None:
    """Refuse two artifacts of different models: their step contracts differ."""
    a, b = reference.config, candidate.config
    for entry in fields(RMTConfig):
        if entry.name != "extra" and getattr(a, entry.name) != getattr(b, entry.name):
            raise ConfigError(
                f"{reference.path.name} and {candidate.path.name} are different models: "
                f"{entry.name} is {getattr(a, entry.name)!r} vs {getattr(b, entry.name)!r}; "
                "compare artifacts of one model (its checkpoint, export, graphs, plan)")
