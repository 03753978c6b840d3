"""The export manifest (``rmt.json``): what an export folder holds and how to run it.

It sits at the bottom of the package, beside the errors and the config, so the runtime
reads it without importing the exporter. numpy only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rmt_deploy.errors import ConfigError, ManifestError
from rmt_deploy.files import atomic_path, sha256_file
from rmt_deploy.spec import RMTConfig

MANIFEST_NAME = "rmt.json"
MANIFEST_FORMAT = "rmt-deploy-export"
MANIFEST_VERSION = 1

# Tensor names of the step contract.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
MEMORY_IN = "memory_in"
MEMORY_OUT = "memory_out"
LOGITS = "logits"

STEP_GRAPH = "step"  # (input_ids, attention_mask, memory_in) -> (logits, memory_out)
READ_GRAPH = "read"  # decoder only: (input_ids, attention_mask, memory_in) -> logits
PRECISIONS = ("fp32", "fp16", "int8")


def graph_key(graph: str, precision: str = "fp32") -> str:
    """Key of a graph in the manifest: ``step``, ``read``, ``step.fp16``, ..."""
    return graph if precision == "fp32" else f"{graph}.{precision}"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str, ...]  # str: a named dynamic axis

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(data["name"], data["dtype"], tuple(data["shape"]))


@dataclass(frozen=True)
class GraphSpec:
    file: str  # relative to the export folder
    sha256: str
    precision: str  # fp32, fp16, bf16 or int8
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file, "sha256": self.sha256, "precision": self.precision,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphSpec:
        return cls(
            data["file"], data["sha256"], data["precision"],
            tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
        )


def step_tensors(config: RMTConfig, graph: str) -> tuple[tuple[TensorSpec, ...], ...]:
    """The inputs and outputs of a graph of the step contract."""
    m, h = config.num_mem_tokens, config.hidden_size
    positions: int | str = config.input_size if config.is_encoder else "tokens"
    inputs = (
        TensorSpec(INPUT_IDS, "int64", ("batch", positions)),
        TensorSpec(ATTENTION_MASK, "int64", ("batch", positions)),
        TensorSpec(MEMORY_IN, "float32", ("batch", m, h)),
    )
    if config.is_encoder:
        logits = TensorSpec(LOGITS, "float32", ("batch", len(config.labels)))
    else:
        logits = TensorSpec(LOGITS, "float32", ("batch", positions, config.vocab_size))
    outputs = (logits,) if graph == READ_GRAPH else (logits, TensorSpec(MEMORY_OUT, "float32",
                                                                         ("batch", m, h)))
    return inputs, outputs


@dataclass
class Manifest:
    """Everything a runtime needs: it guesses nothing."""

    config: RMTConfig
    graphs: dict[str, GraphSpec]  # STEP_GRAPH, and READ_GRAPH for decoders
    initial_memory: dict[str, Any]  # file, sha256, shape, dtype
    tokenizer: dict[str, Any] | None  # file, sha256
    source: dict[str, Any]  # checkpoint name, sha256, format
    exporter: dict[str, Any]  # versions, opset, attention kernel
    validation: dict[str, Any] = field(default_factory=dict)  # errors measured
    engines: dict[str, Any] = field(default_factory=dict)  # TensorRT plans: file, versions, GPU
    folder: Path | None = None  # where it was read from

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "rmt_config": self.config.to_dict(),
            "graphs": {name: graph.to_dict() for name, graph in self.graphs.items()},
            "initial_memory": self.initial_memory,
            "tokenizer": self.tokenizer,
            "source": self.source,
            "exporter": self.exporter,
            "validation": self.validation,
            "engines": self.engines,
        }

    def path(self, relative: str) -> Path:
        if self.folder is None:
            raise ManifestError("manifest has no folder; read it with read_manifest()")
        return self.folder / relative

    def load_initial_memory(self) -> np.ndarray:
        """The learned initial memory, [M, H] float32."""
        memory = np.load(self.path(self.initial_memory["file"]), allow_pickle=False)
        expected = (self.config.num_mem_tokens, self.config.hidden_size)
        if memory.shape != expected:
            raise ManifestError(f"{self.initial_memory['file']}: shape {memory.shape}, "
                                f"expected {expected}; re-export the model")
        return memory.astype(np.float32)


def write_manifest(manifest: Manifest, folder: Path) -> Path:
    """Write ``rmt.json`` atomically."""
    target = folder / MANIFEST_NAME
    with atomic_path(target) as temp:
        temp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return target


def read_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """Read and check an export folder: every file present, every hash matching."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{folder}: no {MANIFEST_NAME} there; pass a folder written by "
                            "rmt-export")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"{path}: not an rmt-deploy manifest")
        if data.get("format_version") != MANIFEST_VERSION:
            raise ManifestError(f"{path}: manifest version {data.get('format_version')} is not "
                                f"supported (this rmt-deploy reads {MANIFEST_VERSION}); re-export")
        manifest = Manifest(
            config=RMTConfig.from_dict(data["rmt_config"]),
            graphs={k: GraphSpec.from_dict(v) for k, v in data["graphs"].items()},
            initial_memory=data["initial_memory"],
            tokenizer=data.get("tokenizer"),
            source=data.get("source", {}),
            exporter=data.get("exporter", {}),
            validation=data.get("validation", {}),
            engines=data.get("engines", {}),
            folder=folder,
        )
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path}: not valid JSON ({error}); re-export the model") from None
    except (KeyError, TypeError, AttributeError) as error:
        raise ManifestError(f"{path}: damaged manifest (missing {error}); re-export") from None
    except ConfigError as error:
        raise ManifestError(f"{path}: {error}") from None
    if STEP_GRAPH not in manifest.graphs:
        raise ManifestError(f"{path}: no '{STEP_GRAPH}' graph listed; re-export the model")
    if verify:
        _verify_files(manifest)
    return manifest


def _verify_files(manifest: Manifest) -> None:
    entries = [(g.file, g.sha256) for g in manifest.graphs.values()]
    entries.append((manifest.initial_memory["file"], manifest.initial_memory["sha256"]))
    if manifest.tokenizer:
        entries.append((manifest.tokenizer["file"], manifest.tokenizer["sha256"]))
    for relative, expected in entries:
        file = manifest.path(relative)
        if not file.is_file():
            raise ManifestError(f"{file}: missing from the export folder; re-export the model")
        if sha256_file(file) != expected:
            raise ManifestError(f"{file}: sha256 does not match the manifest (the file was "
                                "changed or replaced); re-export the model")
