"""Judging freshly built TensorRT plans before they are kept: they run closed loop through
the TensorRT backend against the FP32 graph (on onnxruntime-gpu or the checkpoint on
torch CUDA where present, else ONNX Runtime on the CPU) over ``drift_segments``, under
the gates of their precision; a decoder's prefill and decode plans then generate greedily
after the validation documents, judged by the same gates."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rmt_deploy.contract import STEP
from rmt_deploy.export.comparator import compare
from rmt_deploy.export.validate import DriftGates, enforce_drift
from rmt_deploy.export.validate_generation import (
    NEW_TOKENS,
    compare_generation,
    enforce_generation,
)
from rmt_deploy.manifest import Manifest
from rmt_deploy.runtime.backends.base import StepEngine
from rmt_deploy.runtime.options import RuntimeOptions

if TYPE_CHECKING:
    from rmt_deploy.export.tensorrt_build import EngineOptions

#: Defaults per plan precision: an FP32 plan must reproduce the FP32 graph (the export's
#: closed-loop tolerance); reduced-precision plans are judged like their ONNX graphs, by
#: agreement, with bounds that catch a broken plan (memory lost, overflow).
PLAN_GATES = {
    "fp32": DriftGates(min_memory_cosine=0.9999, max_abs=1e-3),
    "fp16": DriftGates(min_memory_cosine=0.99, max_abs=1.0),
    "int8": DriftGates(min_memory_cosine=0.99, max_abs=1.0),
}


def plan_gates(precision: str, options: EngineOptions) -> DriftGates:
    """The gates of plans of ``precision``, with the options' overrides."""
    defaults = PLAN_GATES[precision]
    return DriftGates(
        min_agreement=options.min_agreement,
        min_memory_cosine=(defaults.min_memory_cosine if options.min_memory_cosine is None
                           else options.min_memory_cosine),
        max_abs=defaults.max_abs if options.max_abs is None else options.max_abs)


def reference_engine(manifest: Manifest, options: EngineOptions) -> tuple[StepEngine, str]:
    """The FP32 reference, fastest first: the FP32 graph on onnxruntime-gpu, the
    checkpoint on torch CUDA, the FP32 graph on ONNX Runtime's CPU; and its description."""
    import onnxruntime

    from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return OnnxRuntimeEngine(manifest, device="cuda"), "fp32 graph on onnxruntime-gpu"
    if options.reference_checkpoint is not None and _torch_cuda():
        from rmt_deploy.model.checkpoint import load_checkpoint
        from rmt_deploy.runtime.backends.torch import TorchEngine

        rmt = load_checkpoint(options.reference_checkpoint, options.authors).rmt
        return TorchEngine(rmt, device="cuda"), "fp32 checkpoint on torch CUDA"
    return (OnnxRuntimeEngine(manifest, RuntimeOptions(threads=options.threads), device="cpu"),
            "fp32 graph on onnxruntime CPU")


def check_plans(manifest: Manifest, options: EngineOptions,
                log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Closed-loop errors of the plans ``manifest.engines`` lists against FP32; raises
    ValidationError naming the first gate, output and segment that fail."""
    from rmt_deploy.runtime.backends.tensorrt import TensorRTEngine

    precision = manifest.engines[STEP]["precision"]
    gates = plan_gates(precision, options)
    reference, description = reference_engine(manifest, options)
    candidate = TensorRTEngine(manifest, RuntimeOptions(backend="tensorrt"))
    comparison = compare(reference, candidate, manifest.load_initial_state(),
                         options.drift_segments, modes=("closed_loop",))
    log(f"tensorrt {precision} plans closed loop vs {description} over "
        f"{comparison.segments} segments: {comparison.closed_loop.summary()}")
    what = f"the TensorRT {precision} plans"
    advice = "; the plans were not kept (rebuild from FP32 graphs, or loosen the gate in " \
             "EngineOptions)"
    enforce_drift(comparison, gates, what, reference="FP32", advice=advice)
    results = {**comparison.to_dict(), "reference": description, "precision": precision,
               "gates": dataclasses.asdict(gates)}
    if candidate.generates and reference.generates:  # the prefill and decode plans
        generation = compare_generation(reference, candidate, manifest.load_initial_state(),
                                        new_tokens=min(NEW_TOKENS, options.max_new_tokens))
        log(f"tensorrt {precision} plans generate {generation['generated_same']:.0%} of "
            f"the rows as {description}; largest logit errors "
            + ", ".join(f"{k} {v:.2e}" for k, v in generation["max_abs"].items()))
        enforce_generation(generation, what, "FP32", gates.max_abs, gates.min_agreement,
                           advice)
        results["generation"] = generation
    return results


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
