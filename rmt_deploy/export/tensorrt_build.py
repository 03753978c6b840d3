"""Building TensorRT plans (10.x / 11.x) from an export folder's graphs with Polygraphy's
loaders — the calibrated Q/DQ INT8 graphs where exported (explicit quantization), else
FP16, else FP32: strongly typed networks, one optimization profile from the contract, a
workspace limit, and a timing cache reused across builds. A plan is built beside its
final name, judged closed loop against the FP32 graph (:mod:`plan_check`), and put in
place with its record in the manifest only when it passes."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmt_deploy.contract import BatchProfile, profile_shapes, variant, variant_names
from rmt_deploy.errors import BackendError
from rmt_deploy.files import atomic_path, sha256_file
from rmt_deploy.manifest import Manifest, graph_key, read_manifest, write_manifest
from rmt_deploy.runtime.backends import _cuda
from rmt_deploy.runtime.backends.tensorrt import import_tensorrt

if TYPE_CHECKING:
    from rmt_deploy.model.checkpoint import AuthorsOptions

ENGINE_PRECISIONS = ("int8", "fp16", "fp32")  # the first the export has is built


@dataclass(frozen=True)
class EngineOptions:
    batch: BatchProfile = BatchProfile()
    workspace_mb: int = 4096
    timing_cache: Path | None = None  # read if present, written back after the build
    max_new_tokens: int = 64  # decoders: room for generated tokens in the decode plan
    drift_segments: int = 1000  # closed-loop run that judges the plans against FP32
    min_agreement: float = 0.99  # closed-loop argmax agreement with FP32 required
    min_memory_cosine: float | None = None  # None: the plans' precision's default
    max_abs: float | None = None  # largest closed-loop error; None: the precision's default
    reference_checkpoint: Path | None = None  # judge against it on torch CUDA (no ORT GPU)
    authors: AuthorsOptions | None = None  # how to read an authors' reference checkpoint
    threads: int | None = None  # CPU threads of a CPU reference


def build_engines(folder: str | Path, options: EngineOptions | None = None,
                  log: Callable[[str], None] = lambda message: None) -> Manifest:
    """Build a plan for every graph of an export folder, judge them closed loop against
    the FP32 graph and, when they pass, keep them and record them (and the judgement, as
    ``validation.tensorrt``) in its manifest. A plan that fails is not kept and raises
    ValidationError; the folder is then as it was."""
    from rmt_deploy.export.plan_check import check_plans

    options = options or EngineOptions()
    trt = import_tensorrt()
    manifest = read_manifest(folder)
    gpu, capability = _cuda.device_name_and_capability()
    records = {}
    with contextlib.ExitStack() as renames:  # each plan replaces its target on success
        for graph in variant_names(manifest.config):
            keys = [graph_key(graph, precision) for precision in ENGINE_PRECISIONS]
            spec = next((manifest.graphs[key] for key in keys if key in manifest.graphs), None)
            if spec is None:
                continue
            target = manifest.path(variant(manifest.config, graph).plan_file)
            temp = renames.enter_context(atomic_path(target))
            shapes = profile_shapes(manifest.config, graph, options.batch,
                                    options.max_new_tokens)
            started = time.perf_counter()
            build_plan(trt, manifest.path(spec.file), shapes, options, temp)
            records[graph] = {
                "file": temp.name, "sha256": sha256_file(temp), "precision": spec.precision,
                "source_graph": spec.file, "tensorrt": trt.__version__, "gpu": gpu,
                "compute_capability": capability,
                "profile": {name: [list(shape) for shape in value]
                            for name, value in shapes.items()},
                "workspace_mb": options.workspace_mb,
            }
            log(f"built {target.name} on {gpu} with TensorRT {trt.__version__} in "
                f"{time.perf_counter() - started:.0f} s")
        # the plans under their temporary names, which the opened folder does not list
        unopened = dataclasses.replace(manifest, engines=records, opened=None)
        results = check_plans(unopened, options, log)
    manifest.engines = {graph: {**record, "file": variant(manifest.config, graph).plan_file}
                        for graph, record in records.items()}
    manifest.validation["tensorrt"] = results
    write_manifest(manifest, manifest.folder)
    return manifest


def network_options(trt: Any) -> dict[str, Any]:
    """``NetworkFromOnnxPath`` options: strongly typed on 10.x (the creation flag) and on
    11.x (always; the flag, deprecated and ignored there, is passed while it exists).
    No precision flags on either: precision lives in the ONNX graph."""
    flags = trt.NetworkDefinitionCreationFlag
    if _major(trt) >= 11 and not hasattr(flags, "STRONGLY_TYPED"):
        return {}
    return {"strongly_typed": True}


def build_plan(trt: Any, onnx_path: Path, shapes: dict[str, tuple[tuple[int, ...], ...]],
               options: EngineOptions, out: Path) -> None:
    """Build and save one plan: Polygraphy's ``NetworkFromOnnxPath`` -> ``CreateConfig``
    (one profile, the workspace limit, the timing cache) -> ``EngineBytesFromNetwork``
    -> ``SaveBytes``."""
    from polygraphy.backend import trt as loaders
    from polygraphy.backend.common import SaveBytes
    from polygraphy.exception import PolygraphyException

    from rmt_deploy.export.polygraphy_log import quiet

    profile = loaders.Profile()
    for name, (low, opt, high) in shapes.items():
        profile.add(name, low, opt, high)
    network = loaders.PostprocessNetwork(
        loaders.NetworkFromOnnxPath(str(onnx_path), **network_options(trt)),
        func=lambda network: _check_strongly_typed(trt, network, onnx_path),
        name="check_strongly_typed")
    cache = options.timing_cache
    config = loaders.CreateConfig(
        profiles=[profile],
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: options.workspace_mb << 20},
        load_timing_cache=str(cache) if cache is not None and cache.is_file() else None)
    build = SaveBytes(loaders.EngineBytesFromNetwork(
        network, config=config, save_timing_cache=str(cache) if cache is not None else None),
        path=str(out))
    try:
        with quiet("WARNING"):
            build()
    except PolygraphyException as error:
        first = " ".join(str(error).split())[:300]
        raise BackendError(f"{onnx_path.name}: TensorRT could not build an engine ({first}); "
                           "see its log above") from None


def _check_strongly_typed(trt: Any, network: Any, onnx_path: Path) -> None:
    """10.x: refuse a weakly typed network (TensorRT would pick precisions itself)."""
    if _major(trt) < 11 and not network.get_flag(
            trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED):
        raise BackendError(f"{onnx_path.name}: parsed into a weakly typed TensorRT network; "
                           "rmt-deploy builds strongly typed plans only (a bug: report it)")


def _major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])
