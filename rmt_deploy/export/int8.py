"""The INT8 stage of an export: calibrate on a corpus by rolling the FP32 recurrence,
quantize under each candidate policy, judge each closed loop against FP32 on held-out
documents (and time it), and keep the fastest policy that keeps the accuracy (within
timing noise of the fastest, the one whose memory drifts least)."""

from __future__ import annotations

import functools
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from rmt_deploy.calibration.collect import CalibrationSteps, collect_steps
from rmt_deploy.calibration.data import CalibrationCorpus
from rmt_deploy.calibration.policies import Policy, applicable_policies, policy_named
from rmt_deploy.calibration.quantize import int8_graph, prepare
from rmt_deploy.contract import STEP, WRITE, state_pairs
from rmt_deploy.errors import ValidationError
from rmt_deploy.export.comparator import Comparison, compare
from rmt_deploy.export.validate import (
    STATE_COSINE,
    agreement_failures,
    check_onnx,
    non_finite_failures,
    state_cosine_failures,
)
from rmt_deploy.export.weights import WeightStore
from rmt_deploy.manifest import Manifest, graph_key, graph_spec
from rmt_deploy.runtime.backends.base import State, StepEngine
from rmt_deploy.runtime.stepper import Stepper
from rmt_deploy.runtime.tokens import ArraySource, TokenSource
from rmt_deploy.spec import RMTConfig

HOLD_OUT_EVERY = 4  # every 4th calibration document judges instead of calibrating
SPEED_NOISE = 0.05  # step-time ratios closer than this to the fastest count as equal


@dataclass
class Trial:
    """A policy's errors against FP32 (closed loop on the held-out documents and one
    long document through them; open loop on the held-out documents) and its speed."""

    errors: Comparison
    speed: dict[str, float]  # fp32_ms, int8_ms, speedup

    def to_dict(self) -> dict[str, Any]:
        return {"errors": self.errors.to_dict(), **self.speed}


@dataclass(frozen=True)
class Int8Options:
    policy: str = "auto"  # a policy name, or "auto": the fastest one that passes
    max_steps: int = 256  # calibration steps kept (a uniform sample over all depths)
    min_agreement: float = 0.99  # closed-loop argmax agreement with FP32 on held-out data
    drift_segments: int = 1000  # the long closed-loop run through the held-out documents
    method: str = "minmax"  # activation ranges: "minmax" or "percentile" (outliers clipped)
    threads: int | None = None
    progress: Callable[[str, int, int], None] | None = None  # (phase, done, total) per step


#: The variants INT8 quantizes: those the calibration steps feed (the step and the write
#: graph). Generation's prefill and decode graphs stay FP32.
QUANTIZED = (STEP, WRITE)


def add_int8(manifest: Manifest, fp32: StepEngine, graph_files: dict[str, str], stage: Path,
             store: WeightStore, options: Int8Options, corpus: CalibrationCorpus,
             log: Callable[[str], None]) -> None:
    """Write ``*.int8.onnx`` graphs (weights into ``store``) calibrated on ``corpus`` and
    record them in ``manifest``: record calibration steps, quantize under every
    candidate policy, judge, keep one."""
    import onnx

    config = manifest.config
    calibrate, judge = _split(corpus.documents)
    initial_state = manifest.load_initial_state()
    steps = collect_steps(fp32, initial_state, calibrate, options.max_steps)
    log(f"calibration: {len(corpus.documents)} documents, {corpus.tokens:,} tokens; "
        f"{len(steps)} steps recorded from the rolled FP32 recurrence (segments 0 to "
        f"{steps.describe()['deepest_segment']}); {len(judge)} documents held out")
    work = stage / ".int8-candidates"
    work.mkdir()
    try:
        prepared = {name: work / f"{name}.prepared.onnx" for name in graph_files}
        for name, file in graph_files.items():
            prepare(stage / file, prepared[name])
        candidates = ([policy_named(options.policy)] if options.policy != "auto"
                      else applicable_policies(onnx.load(str(prepared[STEP]),
                                                         load_external_data=False),
                                               _state_outputs(manifest.config)))
        table = {}
        for policy in candidates:
            table[policy.name] = _judge(policy, manifest, fp32, prepared, steps, judge,
                                        initial_state, work, options)
            log(_describe(policy, table[policy.name]))
        chosen = _choose(candidates, table, options, config.is_armt)
        log(f"int8 policy: {chosen.name} ({chosen.description})")
        for name, file in graph_files.items():
            target = stage / Path(file).with_suffix(".int8.onnx").name
            store.add_graph(work / f"{name}.{chosen.name}.onnx", target)
            manifest.graphs[graph_key(name, "int8")] = graph_spec(config, name, target, "int8",
                                                                 data=store.reference)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    manifest.validation["int8"] = {
        "policy": chosen.name, "policy_description": chosen.description,
        "reference": "fp32 graph on onnxruntime", "min_agreement": options.min_agreement,
        "calibration": {**corpus.describe(config), **steps.describe(),
                        "held_out_documents": len(judge), "method": options.method},
        "candidates": {name: trial.to_dict() for name, trial in table.items()},
        **table[chosen.name].errors.to_dict(),
    }


def _state_outputs(config: RMTConfig) -> list[str]:
    """The step's declared state outputs, whose making stays FP32."""
    return [pair.name_out for pair in state_pairs(config)]


def _split(documents: Sequence[TokenSource]) -> tuple[list[TokenSource], list[TokenSource]]:
    documents = [document for document in documents if len(document)]
    held = set(range(HOLD_OUT_EVERY - 1, len(documents), HOLD_OUT_EVERY)) or {len(documents) - 1}
    return ([d for i, d in enumerate(documents) if i not in held],
            [d for i, d in enumerate(documents) if i in held])


def _judge(policy: Policy, manifest: Manifest, fp32: StepEngine, prepared: dict[str, Path],
           steps: CalibrationSteps, judge: list[TokenSource], initial_state: State,
           work: Path, options: Int8Options) -> Trial:
    """Quantize under ``policy``; its closed-loop errors on held-out data and its speed."""
    from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine
    from rmt_deploy.runtime.options import RuntimeOptions

    key_graphs = {}
    for name, source in prepared.items():
        target = work / f"{name}.{policy.name}.onnx"
        int8_graph(source, target, steps, policy, options.method,
                   _state_outputs(manifest.config))
        check_onnx(target)
        spec = graph_spec(manifest.config, name, target, "int8")
        key_graphs[graph_key(name, "int8")] = replace(spec, file=f"{work.name}/{target.name}")
    manifest.graphs.update(key_graphs)
    try:
        candidate = OnnxRuntimeEngine(manifest, RuntimeOptions(threads=options.threads,
                                                               precision="int8"))
        closed = compare(fp32, candidate, initial_state, modes=("closed_loop",),
                         batches=_judging_batches(judge, manifest.config,
                                                  options.drift_segments),
                         progress=None if options.progress is None else functools.partial(
                             options.progress, f"judging int8 policy {policy.name}"))
        # one step from FP32's own memory: the quantization error before it compounds
        opened = compare(fp32, candidate, initial_state, modes=("open_loop",),
                         batches=_judging_batches(judge, manifest.config, 0))
        speed = _ms_per_step(fp32, candidate, steps)
    finally:
        for key in key_graphs:
            del manifest.graphs[key]
    speed["speedup"] = speed["fp32_ms"] / speed["int8_ms"]
    return Trial(replace(closed, open_loop=opened.open_loop),
                 {k: round(v, 4) for k, v in speed.items()})


def _judging_batches(judge: list[TokenSource], config: RMTConfig, drift_segments: int
                     ) -> list[list[TokenSource]]:
    """The held-out documents as they are, then one long document that runs through them
    again and again for ``drift_segments`` segments (recurrence far past their length),
    if ``drift_segments`` is not 0."""
    batches = [judge[i : i + 16] for i in range(0, len(judge), 16)]
    if not drift_segments:
        return batches
    ids = np.concatenate([document.tokens(0, len(document)) for document in judge])
    repeats = -(-drift_segments * config.segment_size // len(ids))
    long = ArraySource(np.tile(ids, repeats)[: drift_segments * config.segment_size], config)
    return [*batches, [long]]


def _ms_per_step(fp32: StepEngine, int8: StepEngine, steps: CalibrationSteps,
                 repeats: int = 15) -> dict[str, float]:
    """Median milliseconds of a batch-1 step on recorded inputs, FP32 and INT8 timed in
    turn so that a change in the machine's load falls on both."""
    times: dict[str, list[float]] = {"fp32_ms": [], "int8_ms": []}
    with Stepper(fp32) as reference, Stepper(int8) as candidate:
        steppers = {"fp32_ms": reference, "int8_ms": candidate}
        for stepper in steppers.values():
            stepper.add(0, {name: array[0] for name, array in steps.state.items()})
        for i in range(repeats + 2):
            j = i % len(steps)
            for key, stepper in steppers.items():
                started = time.perf_counter()
                stepper.run([0], steps.input_ids[j : j + 1], steps.attention_mask[j : j + 1])
                times[key].append(time.perf_counter() - started)
    return {key: float(np.median(values[2:]) * 1e3) for key, values in times.items()}


def _describe(policy: Policy, trial: Trial) -> str:
    drift, step = trial.errors.closed_loop, trial.errors.open_loop
    memory = max(drift.max_abs[name] for name in drift.memory_cosine)  # the state outputs
    return (f"int8 {policy.name}: one step: memory cosine >= {step.min_memory_cosine:.4f}; "
            f"closed loop: predictions agree {drift.agreement:.2%}, memory cosine "
            f">= {drift.min_memory_cosine:.4f}, memory max abs {memory:.2e} over "
            f"{trial.errors.segments} held-out segments; {trial.speed['int8_ms']:.2f} ms/step "
            f"vs fp32 {trial.speed['fp32_ms']:.2f} ({trial.speed['speedup']:.2f}x)")


def _passes(errors: Comparison, min_agreement: float, states: bool) -> bool:
    """Finite, agreeing, and (``states``: an armt) every state pair within
    STATE_COSINE["int8"]."""
    return not (non_finite_failures(errors)
                or agreement_failures(errors.closed_loop, min_agreement)
                or (states and state_cosine_failures(errors.closed_loop, STATE_COSINE["int8"])))


def _choose(candidates: list[Policy], table: dict[str, Trial], options: Int8Options,
            states: bool) -> Policy:
    passing = [p for p in candidates
               if _passes(table[p.name].errors, options.min_agreement, states)]
    if passing:  # the fastest; within timing noise of it, the one that drifts least
        fastest = max(table[p.name].speed["speedup"] for p in passing)
        close = [p for p in passing
                 if table[p.name].speed["speedup"] >= fastest * (1 - SPEED_NOISE)]
        return max(close, key=lambda p: table[p.name].errors.closed_loop.min_memory_cosine)
    best = max(candidates, key=lambda p: table[p.name].errors.closed_loop.agreement)
    agreement = table[best.name].errors.closed_loop.agreement
    drifting = states and state_cosine_failures(table[best.name].errors.closed_loop,
                                                STATE_COSINE["int8"])
    if drifting and agreement >= options.min_agreement:
        raise ValidationError(drifting[0].describe(f"INT8 policy {best.name}", "FP32")
                              + "; export FP32/FP16 only or try another --int8-policy")
    raise ValidationError(
        f"no INT8 policy keeps the accuracy: the best ({best.name}) agrees with FP32 on "
        f"{agreement:.2%} of held-out closed-loop predictions, below "
        f"{options.min_agreement:.0%}; try more or longer calibration documents, "
        "another --int8-policy, or export FP32/FP16 only (--min-agreement lowers the bar)")

