"""Writing a Triton model repository entry for an export folder, atomically: the model
folder is staged beside its place and renamed in only when complete."""

from __future__ import annotations

import shutil
from pathlib import Path

from rmt_deploy.contract import STEP, ZEROS, state_pairs
from rmt_deploy.errors import ConfigError, ManifestError
from rmt_deploy.export.folder import foreign_files
from rmt_deploy.export.weights import WEIGHTS_FILE
from rmt_deploy.files import atomic_folder, sha256_file
from rmt_deploy.manifest import MANIFEST_NAME, Manifest, graph_key, read_manifest
from rmt_deploy.serving.config import (
    EXPORT_FOLDER,
    PRECISION_PARAMETER,
    ServingOptions,
    config_text,
    initial_state_file,
    model_config,
)
from rmt_deploy.serving.identity import MODEL_ID_PARAMETER

#: The python-backend model, copied into the repository as ``1/model.py``.
PYTHON_MODEL = Path(__file__).with_name("python_model.py")


def write_repository(repo: str | Path, export: str | Path, options: ServingOptions) -> Path:
    """Write ``REPO/NAME`` (config.pbtxt, version 1, initial state) for the export
    folder ``export``; other models in ``REPO`` are left as they are. Returns the
    model folder."""
    manifest = read_manifest(export)
    target = Path(repo) / options.name
    _check_replaceable(target, manifest)
    with atomic_folder(target, check=lambda: _check_replaceable(target, manifest)) as stage:
        version = stage / "1"
        version.mkdir()
        if options.backend == "python":
            key = _graph_key(manifest, options.precision)
            _copy_export(manifest, version / EXPORT_FOLDER)
            shutil.copyfile(PYTHON_MODEL, version / "model.py")
            config = model_config(manifest, options, key)
            config.parameters[PRECISION_PARAMETER].string_value = options.precision
        elif options.backend == "onnxruntime":
            key = _graph_key(manifest, options.precision)
            graph = manifest.graphs[key]
            shutil.copyfile(manifest.path(graph.file), version / "model.onnx")
            for entry in graph.data:  # the weights file the graph refers to, by its name
                shutil.copyfile(manifest.path(entry["file"]), version / entry["file"])
            config = model_config(manifest, options, key)
        else:
            key = _copy_plan(manifest, version / "model.plan", options.max_batch_size)
            config = model_config(manifest, options, key)
        if options.backend != "python":
            _write_initial_state(manifest, stage / "initial_state")
        (stage / "config.pbtxt").write_text(config_text(config))
    return target


#: What a model folder written by rmt-triton holds, besides the export in 1/export/ and
#: the initial state files.
_ENTRY_FILES = {"config.pbtxt", "1/model.py", "1/model.onnx", f"1/{WEIGHTS_FILE}", "1/model.plan"}


def _check_replaceable(target: Path, manifest: Manifest) -> None:
    """Refuse to replace ``target`` unless it is a model folder rmt-triton wrote for this
    model's contract, holding nothing else."""
    entries = _ENTRY_FILES | {f"initial_state/{initial_state_file(pair)}"
                              for pair in state_pairs(manifest.config) if pair.initial != ZEROS}
    if not target.exists():
        return
    if not target.is_dir() or target.is_symlink():
        raise ConfigError(f"{target}: exists and is not a model folder; pick another --name")
    config = target / "config.pbtxt"
    if not config.is_file() or MODEL_ID_PARAMETER not in config.read_text(errors="replace"):
        raise ConfigError(f"{target}: is not a model folder written by rmt-triton; pick "
                          "another --name or move it away")
    export = target / "1" / EXPORT_FOLDER
    foreign = [f"1/{EXPORT_FOLDER}/{name}" for name in foreign_files(export)] \
        if export.is_dir() else []
    for path in target.rglob("*"):
        relative = path.relative_to(target).as_posix()
        if path.is_file() and relative not in entries and not relative.startswith(
                f"1/{EXPORT_FOLDER}/"):
            foreign.append(relative)
    if foreign:
        raise ConfigError(f"{target}: holds {', '.join(sorted(foreign)[:3])}"
                          f"{f' +{len(foreign) - 3} more' if len(foreign) > 3 else ''}, "
                          "which rmt-triton did not write; move them out or pick another "
                          "--name")


def _graph_key(manifest: Manifest, precision: str) -> str:
    key = graph_key(STEP, precision)
    if key not in manifest.graphs:
        raise ConfigError(f"this export has no {precision} step graph; re-export with "
                          f"--precision {precision} or serve fp32")
    return key


def _copy_export(manifest: Manifest, folder: Path) -> None:
    """Every file the manifest lists (the runtime verifies them all), and the manifest."""
    folder.mkdir()
    for relative in sorted(manifest.files()) + [MANIFEST_NAME]:
        shutil.copyfile(manifest.path(relative), folder / relative)


def _copy_plan(manifest: Manifest, target: Path, max_batch_size: int) -> str:
    """Copy the TensorRT step plan; returns the manifest key of the graph it was built
    from (whose tensors it has)."""
    engine = manifest.engines.get(STEP)
    if engine is None:
        raise ManifestError("this export has no TensorRT plan; build one with rmt-export "
                            "--engine on the GPU that will serve it")
    source = manifest.path(engine["file"])
    if not source.is_file() or sha256_file(source) != engine["sha256"]:
        raise ManifestError(f"{source}: missing or changed since rmt-export built it; "
                            "rebuild it with rmt-export --engine")
    low, _, high = engine["profile"]["input_ids"]
    if low[0] != 1 or high[0] < max_batch_size:
        raise ConfigError(f"the plan's batch profile is {low[0]}..{high[0]}; Triton needs "
                          f"1..{max_batch_size}: rebuild with rmt-export --engine --batch "
                          f"1,1,{max_batch_size} or lower --max-batch-size")
    shutil.copyfile(source, target)
    return next(key for key, spec in manifest.graphs.items()
                if spec.file == engine["source_graph"])


def _write_initial_state(manifest: Manifest, folder: Path) -> None:
    """The initial value of every state pair that does not start at zero, raw
    little-endian and row-major, in ``folder``."""
    folder.mkdir()
    initial = manifest.load_initial_state()
    for pair in state_pairs(manifest.config):
        if pair.initial != ZEROS:
            value = initial[pair.name_in]
            (folder / initial_state_file(pair)).write_bytes(
                value.astype(value.dtype.newbyteorder("<")).tobytes())

