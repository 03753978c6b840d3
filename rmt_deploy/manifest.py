"""The export manifest (``rmt.json``): what an export folder holds and how to run it.

It sits at the bottom of the package, beside the errors and the config, so the runtime
reads it without importing the exporter. numpy only.
"""

from __future__ import annotations

import io
import json
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rmt_deploy.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    STEP,
    ZEROS,
    Tensor,
    cache_pairs,
    start_state,
    state_pairs,
    variant,
    variant_names,
)
from rmt_deploy.errors import ConfigError, ManifestError
from rmt_deploy.files import atomic_path, sha256_file
from rmt_deploy.opened import OpenedFolder
from rmt_deploy.spec import RMTConfig

MANIFEST_NAME = "rmt.json"
MANIFEST_FORMAT = "rmt-deploy-export"
MANIFEST_VERSION = 3  # 2: generation with a KV cache (prefill, decode), one weights file;
# 3: the initial value of every state pair (initial_state) in place of initial_memory
MAX_MANIFEST_BYTES = 8 << 20  # a manifest is a few KB; anything this big is not one
MAX_JSON_DEPTH = 32

PRECISIONS = ("fp32", "fp16", "int8")


def graph_key(graph: str, precision: str = "fp32") -> str:
    """Key of a graph in the manifest: ``step``, ``write``, ``prefill``, ``step.fp16``, ..."""
    return graph if precision == "fp32" else f"{graph}.{precision}"


def split_key(key: str) -> tuple[str, str]:
    """Inverse of :func:`graph_key`: ``(graph, precision)``."""
    graph, _, precision = key.partition(".")
    return graph, precision or "fp32"


@dataclass(frozen=True)
class GraphSpec:
    file: str  # relative to the export folder
    sha256: str
    precision: str  # fp32, fp16, bf16 or int8
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    data: tuple[dict[str, str], ...] = ()  # external weight files: {"file", "sha256"}

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file, "sha256": self.sha256, "precision": self.precision,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "data": [dict(entry) for entry in self.data],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphSpec:
        return cls(
            data["file"], data["sha256"], data["precision"],
            tuple(Tensor.from_dict(t) for t in data["inputs"]),
            tuple(Tensor.from_dict(t) for t in data["outputs"]),
            tuple({"file": e["file"], "sha256": e["sha256"]} for e in data.get("data", [])),
        )


def graph_spec(config: RMTConfig, graph: str, path: Path, precision: str = "fp32",
               data: tuple[dict[str, str], ...] = ()) -> GraphSpec:
    """The manifest entry of a graph file written for variant ``graph`` of the contract."""
    contract = variant(config, graph)
    return GraphSpec(path.name, sha256_file(path), precision, contract.inputs,
                     contract.outputs, data)


@dataclass
class Manifest:
    """Everything a runtime needs: it guesses nothing."""

    config: RMTConfig
    graphs: dict[str, GraphSpec]  # by graph_key: "step", "write", "prefill", "step.fp16", ...
    initial_state: dict[str, dict[str, Any]]  # state pairs that do not start at zero, by
    # input name: file, sha256, shape (one row's), dtype
    tokenizer: dict[str, Any] | None  # file, sha256
    source: dict[str, Any]  # checkpoint name, sha256, format
    exporter: dict[str, Any]  # versions, opset, attention kernel
    validation: dict[str, Any] = field(default_factory=dict)  # errors measured
    engines: dict[str, Any] = field(default_factory=dict)  # TensorRT plans: file, versions, GPU
    weights: dict[str, Any] = field(default_factory=dict)  # the graphs' shared weights file:
    # file, and where each tensor lies in it (offset, bytes, dtype, shape) for mapping it
    folder: Path | None = None  # where it was read from
    sha256: str | None = None  # of rmt.json as read (None: not read from a folder)
    opened: OpenedFolder | None = field(default=None, repr=False, compare=False)
    # every listed file, opened and hashed when the manifest was read (None: unverified)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "rmt_config": self.config.to_dict(),
            "graphs": {name: graph.to_dict() for name, graph in self.graphs.items()},
            "initial_state": self.initial_state,
            "tokenizer": self.tokenizer,
            "source": self.source,
            "exporter": self.exporter,
            "validation": self.validation,
            "engines": self.engines,
            "weights": self.weights,
        }

    def path(self, relative: str) -> Path:
        if self.folder is None:
            raise ManifestError("manifest has no folder; read it with read_manifest()")
        return self.folder / relative

    def read_bytes(self, relative: str) -> bytes:
        """A listed file's bytes as they were when the manifest was read (a file changed
        in place since is a ManifestError); an unverified manifest's, as they are now."""
        if self.opened is not None:
            return self.opened.read(relative)
        return self.path(relative).read_bytes()

    def size(self, relative: str) -> int:
        """A listed file's size in bytes."""
        if self.opened is not None:
            return self.opened.size(relative)
        return self.path(relative).stat().st_size

    def mapped(self, relative: str) -> mmap.mmap | np.memmap:
        """A listed file mapped copy-on-write (never written back), as it was opened."""
        if self.opened is not None:
            return self.opened.mapped(relative)
        return np.memmap(self.path(relative), dtype=np.uint8, mode="c")

    def check_paths(self, relatives: list[str]) -> None:
        """For libraries that read by path only (call it after they read): each path
        still names the file opened under it, unchanged; else a ManifestError."""
        if self.opened is not None:
            self.opened.check_paths(relatives)

    def files(self) -> dict[str, str]:
        """Every file the manifest lists (graphs, their weight data, initial state,
        tokenizer, plans): relative name -> sha256."""
        entries = [(g.file, g.sha256) for g in self.graphs.values()]
        entries += [(d["file"], d["sha256"]) for g in self.graphs.values() for d in g.data]
        entries += [(r["file"], r["sha256"]) for r in self.initial_state.values()]
        if self.tokenizer:
            entries.append((self.tokenizer["file"], self.tokenizer["sha256"]))
        entries += [(plan["file"], plan["sha256"]) for plan in self.engines.values()]
        return dict(entries)

    def identity(self) -> str:
        """The one identity of the export: the sha256 of its ``rmt.json`` as it was read
        (it holds every file's sha256, so one identity covers all its graphs, plans,
        initial state and backends). Saved sessions, served sequences, progress files
        and the backend-choice cache are keyed by it."""
        if self.sha256 is not None:
            return self.sha256
        return sha256_file(self.path(MANIFEST_NAME))

    def load_initial_state(self) -> dict[str, np.ndarray]:
        """One row's initial state, every pair of the contract by input name: zeros, or
        the value the export holds, in the pair's dtype and shape, finite."""
        learned = {}
        pairs = {pair.name_in: pair for pair in state_pairs(self.config)}
        for name, record in self.initial_state.items():
            file, pair = record["file"], pairs[name]
            try:
                value = np.load(io.BytesIO(self.read_bytes(file)), allow_pickle=False)
            except (ValueError, OSError, EOFError) as error:
                raise ManifestError(f"{file}: not a readable .npy array ({error}); re-export "
                                    "the model") from None
            if not isinstance(value, np.ndarray) or value.dtype != np.dtype(pair.dtype) or \
                    value.shape != pair.row_shape:
                raise ManifestError(f"{file}: {getattr(value, 'dtype', type(value).__name__)} "
                                    f"{getattr(value, 'shape', '')}, expected {pair.dtype} "
                                    f"{pair.row_shape} (the initial {name}); re-export the "
                                    "model")
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise ManifestError(f"{file}: the initial {name} holds NaN or infinity; "
                                    "re-export the model from a healthy checkpoint")
            learned[name] = value
        return start_state(self.config, learned)


def initial_state_records(config: RMTConfig, state: dict[str, np.ndarray],
                          folder: Path) -> dict[str, dict[str, Any]]:
    """Save the initial value of each state pair that does not start at zero into
    ``folder`` (``{name}.init.npy``) and return the manifest's records of them."""
    records = {}
    for pair in state_pairs(config):
        if pair.initial != ZEROS:
            file = f"{pair.name_in}.init.npy"
            value = np.ascontiguousarray(state[pair.name_in], dtype=pair.dtype)
            np.save(folder / file, value)
            records[pair.name_in] = {"file": file, "sha256": sha256_file(folder / file),
                                     "shape": list(value.shape), "dtype": pair.dtype}
    return records


def write_manifest(manifest: Manifest, folder: Path) -> Path:
    """Write ``rmt.json`` atomically."""
    target = folder / MANIFEST_NAME
    with atomic_path(target) as temp:
        temp.write_text(json.dumps(manifest.to_dict(), indent=2, allow_nan=False) + "\n")
    return target


def read_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """Read and check an export folder: a bounded JSON manifest whose config agrees with
    the graphs' declared tensors, every file a plain name inside the folder, present and
    matching its sha256. Verified, every file stays open (``manifest.opened``): later
    reads get the files as they were checked here, whatever happens to the folder."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{folder}: no {MANIFEST_NAME} there; pass a folder written by "
                            "rmt-export")
    opened = OpenedFolder(folder)
    try:
        manifest = _read_opened(opened, path, verify)
    except BaseException:
        opened.close()
        raise
    if manifest.opened is None:  # unverified: nothing is read through it
        opened.close()
    opened.seal()
    return manifest


def _read_opened(opened: OpenedFolder, path: Path, verify: bool) -> Manifest:
    """:func:`read_manifest` through the folder's handle: the manifest and every file it
    lists come from one folder, even one renamed meanwhile."""
    folder = opened.folder
    opened.open(MANIFEST_NAME, MAX_MANIFEST_BYTES)
    data = _read_json(opened.read(MANIFEST_NAME), path)
    try:
        if data.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"{path}: not an rmt-deploy manifest")
        if data.get("format_version") != MANIFEST_VERSION:
            raise ManifestError(f"{path}: manifest version {data.get('format_version')} is not "
                                f"supported (this rmt-deploy reads {MANIFEST_VERSION}); re-export")
        manifest = Manifest(
            config=RMTConfig.from_dict(data["rmt_config"]),
            graphs={str(k): GraphSpec.from_dict(v) for k, v in data["graphs"].items()},
            initial_state={str(k): dict(v) for k, v in data["initial_state"].items()},
            tokenizer=dict(data["tokenizer"]) if data.get("tokenizer") else None,
            source=data.get("source", {}),
            exporter=data.get("exporter", {}),
            validation=data.get("validation", {}),
            engines={str(k): dict(v) for k, v in data.get("engines", {}).items()},
            weights=dict(data.get("weights") or {}),
            folder=folder,
            sha256=opened.sha256(MANIFEST_NAME),
        )
        files = manifest.files()
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise ManifestError(f"{path}: damaged manifest ({type(error).__name__}: {error}); "
                            "re-export") from None
    except ConfigError as error:
        raise ManifestError(f"{path}: {error}; re-export the model") from None
    if STEP not in manifest.graphs:
        raise ManifestError(f"{path}: no '{STEP}' graph listed; re-export the model")
    _check_graphs(manifest, path)
    _check_weights(manifest, path)
    for name in files:
        _check_plain_name(name, path)
    if verify:
        _verify_files(manifest, files, opened)
        manifest.opened = opened
    return manifest


def _read_json(raw: bytes, path: Path) -> dict[str, Any]:
    """The manifest's JSON (read bounded in size), bounded in depth."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path}: not valid JSON ({error}); re-export the model") from None
    except RecursionError:
        data = None
    if not isinstance(data, dict) or _depth(data) > MAX_JSON_DEPTH:
        raise ManifestError(f"{path}: not a manifest (a JSON object nested at most "
                            f"{MAX_JSON_DEPTH} deep); re-export the model")
    return data


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    children = value.values() if isinstance(value, dict) else (
        value if isinstance(value, list) else ())
    return max((_depth(child, level + 1) for child in children), default=level)


def _check_graphs(manifest: Manifest, path: Path) -> None:
    """Each graph is a variant of the contract, with the tensors the config implies."""
    config = manifest.config
    for key, spec in manifest.graphs.items():
        graph, precision = split_key(key)
        if graph not in variant_names(config) or precision not in PRECISIONS or (
                precision != "fp32" and spec.precision != precision):
            raise ManifestError(f"{path}: graph {key!r} ({spec.precision}) is not one a "
                                f"{config.variant} RMT has; re-export the model")
        contract = variant(config, graph)
        for kind, declared, expected in (("input", spec.inputs, contract.inputs),
                                         ("output", spec.outputs, contract.outputs)):
            if declared != expected:
                raise ManifestError(f"{path}: graph {key!r} declares "
                                    f"{_mismatch(config, kind, declared, expected)}; "
                                    "re-export the model")
    pairs = {pair.name_in: pair for pair in state_pairs(config) if pair.initial != ZEROS}
    if sorted(manifest.initial_state) != sorted(pairs):
        raise ManifestError(f"{path}: initial_state lists {sorted(manifest.initial_state)}, "
                            f"the contract's state starts from {sorted(pairs)}; re-export the "
                            "model")
    for name, pair in pairs.items():
        record = manifest.initial_state[name]
        expected = list(pair.row_shape)
        if record.get("shape") != expected or record.get("dtype") != pair.dtype:
            raise ManifestError(f"{path}: initial_state {name} is {record.get('dtype')} "
                                f"{record.get('shape')}, the config implies {pair.dtype} "
                                f"{expected}; re-export the model")


def _check_weights(manifest: Manifest, path: Path) -> None:
    """The weights index names a file the graphs read, with non-negative int offsets and
    sizes (the file's sha256 is checked with the others)."""
    if not manifest.weights:
        return
    name = manifest.weights.get("file")
    read = {entry["file"] for spec in manifest.graphs.values() for entry in spec.data}
    tensors = manifest.weights.get("tensors")
    if name not in read or not isinstance(tensors, dict) or not all(
            isinstance(t, dict) and isinstance(t.get("offset"), int) and
            isinstance(t.get("bytes"), int) and t["offset"] >= 0 and t["bytes"] >= 0
            for t in tensors.values()):
        raise ManifestError(f"{path}: its weights index does not describe a file its graphs "
                            "read; re-export the model")


def _tensors_text(tensors: tuple[Tensor, ...]) -> str:
    return ", ".join(f"{t.name} {t.dtype}[{', '.join(map(str, t.shape))}]" for t in tensors)


def _mismatch(config: RMTConfig, kind: str, declared: tuple[Tensor, ...],
              expected: tuple[Tensor, ...]) -> str:
    """What differs: the first declared tensor unlike the config's, with the config
    fields sizing the axes it differs in (every tensor where the names differ)."""
    found = {t.name: t for t in declared}
    if sorted(found) != sorted(t.name for t in expected):
        return (f"{kind}s {_tensors_text(declared)}, but its rmt_config implies "
                f"{_tensors_text(expected)}")
    tensor = next(t for t in expected if found[t.name] != t)
    other = found[tensor.name]
    fields = [name for name, a, b in zip(_sized_by(config, tensor.name), other.shape,
                                         tensor.shape, strict=False) if name and a != b]
    values = ", ".join(f"{len(config.labels)} labels" if name == "labels" else
                       f"{name} {getattr(config, name)}" for name in fields)
    return (f"{kind} {_tensors_text((other,))}, but its rmt_config"
            f"{f' ({values})' if values else ''} implies {_tensors_text((tensor,))}")


def _sized_by(config: RMTConfig, name: str) -> tuple[str | None, ...]:
    """The config field sizing each axis of a contract tensor (None: a dynamic axis)."""
    for pair in (*state_pairs(config), *cache_pairs(config)):
        if name in (pair.name_in, pair.name_out):
            return pair.sized_by
    if name == LOGITS:
        return (None, "labels") if config.is_encoder else (None, None, "vocab_size")
    if name in (INPUT_IDS, ATTENTION_MASK):
        return (None, "input_size" if config.is_encoder else None)
    return ()


def _check_plain_name(name: Any, path: Path) -> None:
    if not isinstance(name, str) or not name or name in (".", "..") or \
            os.path.basename(name) != name or "\\" in name or "\0" in name:
        raise ManifestError(f"{path}: lists the file {name!r}, which is not a plain name "
                            "inside the export folder; the manifest was tampered with, "
                            "re-export the model")


def _verify_files(manifest: Manifest, files: dict[str, str], opened: OpenedFolder) -> None:
    """Open every file and check its sha256, from the handle kept for later reads."""
    folder = manifest.folder.resolve()
    for relative, expected in files.items():
        file = manifest.path(relative)
        if file.is_symlink() and file.resolve().parent != folder:
            raise ManifestError(f"{file}: a link that leaves the export folder; copy the "
                                "file in or re-export the model")
        if opened.open(relative) != expected:
            raise ManifestError(f"{file}: sha256 does not match the manifest (the file was "
                                "changed or replaced); re-export the model")
