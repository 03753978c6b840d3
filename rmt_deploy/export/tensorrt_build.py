"""Building TensorRT plans (10.x / 11.x API) from an export folder's graphs — the
calibrated Q/DQ INT8 graphs where exported (explicit quantization), else FP16, else
FP32: strongly typed networks, one optimization profile, a workspace
limit, and a timing cache reused across builds. The plans and their build facts go into
the manifest."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rmt_deploy.contract import BatchProfile, profile_shapes, variant, variant_names
from rmt_deploy.errors import BackendError
from rmt_deploy.files import atomic_path, sha256_file
from rmt_deploy.manifest import Manifest, graph_key, read_manifest, write_manifest
from rmt_deploy.runtime.backends import _cuda
from rmt_deploy.runtime.backends.tensorrt import import_tensorrt

ENGINE_PRECISIONS = ("int8", "fp16", "fp32")  # the first the export has is built


@dataclass(frozen=True)
class EngineOptions:
    batch: BatchProfile = BatchProfile()
    workspace_mb: int = 4096
    timing_cache: Path | None = None  # read if present, written back after the build
    max_new_tokens: int = 64  # decoders: room for generated tokens in the read plan


def build_engines(folder: str | Path, options: EngineOptions | None = None,
                  log: Callable[[str], None] = lambda message: None) -> Manifest:
    """Build a plan for every graph of an export folder and record them in its manifest."""
    options = options or EngineOptions()
    trt = import_tensorrt()
    manifest = read_manifest(folder)
    gpu, capability = _cuda.device_name_and_capability()
    logger = trt.Logger(trt.Logger.WARNING)
    for graph in variant_names(manifest.config):
        keys = [graph_key(graph, precision) for precision in ENGINE_PRECISIONS]
        spec = next((manifest.graphs[key] for key in keys if key in manifest.graphs), None)
        if spec is None:
            continue
        started = time.perf_counter()
        plan = _build(trt, logger, manifest.path(spec.file), manifest, graph, options)
        target = manifest.path(variant(manifest.config, graph).plan_file)
        with atomic_path(target) as temp:
            temp.write_bytes(plan)
        manifest.engines[graph] = {
            "file": target.name, "sha256": sha256_file(target), "precision": spec.precision,
            "source_graph": spec.file, "tensorrt": trt.__version__, "gpu": gpu,
            "compute_capability": capability,
            "profile": {name: [list(shape) for shape in shapes] for name, shapes in
                        profile_shapes(manifest.config, graph, options.batch,
                                       options.max_new_tokens).items()},
            "workspace_mb": options.workspace_mb,
        }
        log(f"built {target.name} on {gpu} with TensorRT {trt.__version__} in "
            f"{time.perf_counter() - started:.0f} s")
    write_manifest(manifest, manifest.folder)
    return manifest


def _build(trt, logger, onnx_path: Path, manifest: Manifest, graph: str,
           options: EngineOptions) -> bytes:
    builder = trt.Builder(logger)
    # Required on 10.x; accepted and ignored on 11.x, where every network is strongly typed.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"{onnx_path.name}: TensorRT cannot parse it: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile_shapes(manifest.config, graph, options.batch,
                                                 options.max_new_tokens).items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    cache_path = options.timing_cache
    cached = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cached), False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(f"{onnx_path.name}: TensorRT could not build an engine (see its "
                           "log above)")
    if cache_path is not None:
        with atomic_path(cache_path) as temp:
            temp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan)
