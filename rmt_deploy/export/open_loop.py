"""The open loop of a comparison through Polygraphy's Comparator: the reference's steps
over a batch of documents are recorded (token ids, mask and the state each step starts
from), then each side runs every recorded step from that same state as a Polygraphy
runner, and ``SimpleCompareFunc`` (``CompareFunc.simple``) judges each output with its
own atol and rtol."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rmt_deploy.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    PREFILL,
    STEP,
    WRITE,
    state_pairs,
    variant,
)
from rmt_deploy.runtime.backends.base import State, StepEngine
from rmt_deploy.runtime.backends.wrapped import StepRecorder
from rmt_deploy.runtime.loop import run_segments
from rmt_deploy.runtime.stepper import Stepper
from rmt_deploy.runtime.tokens import TokenSource


@dataclass(frozen=True)
class Step:
    """One recorded step: its inputs, the state it starts from, its segment."""

    feed: dict[str, np.ndarray]
    segment: int


def record_steps(engine: StepEngine, initial_state: State,
                 batches: Sequence[Sequence[TokenSource]]) -> list[Step]:
    """Every step ``engine`` runs over ``batches`` in closed loop, with its inputs."""
    recorded: list[Step] = []
    for sources in batches:
        first = len(recorded)

        def record(input_ids, attention_mask, state, first=first):
            feed = {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask, **state}
            recorded.append(Step(feed, len(recorded) - first))

        with Stepper(StepRecorder(engine, record)) as stepper:
            for row in range(len(sources)):
                stepper.add(row, initial_state)
            run_segments(stepper, sources, lambda *args: None)
    return recorded


def step_outputs(engine: StepEngine, feed: Mapping[str, np.ndarray], prefill: bool
                 ) -> dict[str, np.ndarray]:
    """One step of ``engine`` from ``feed``'s state: the logits (a decoder's padded
    positions zeroed: they are not used), the new state (each pair as its output name),
    its write graph's (``write_`` + the output name) where it has one, and with
    ``prefill`` its prefill graph's logits (generation's first step)."""
    ids, mask = feed[INPUT_IDS], feed[ATTENTION_MASK]
    pairs = state_pairs(engine.config)
    start = {pair.name_in: feed[pair.name_in] for pair in pairs}
    outputs = OrderedDict()
    with engine.new_state(start) as state:
        if prefill:
            outputs["prefill_logits"] = state.prefill(ids, mask)[0]
        logits = state.step(ids, mask)
        outputs[LOGITS] = logits if engine.config.is_encoder else logits * mask[..., None]
        written = state.state()
        outputs.update((pair.name_out, written[pair.name_in]) for pair in pairs)
    if WRITE in engine.graphs:
        with engine.new_state(start) as state:
            state.step(ids, mask, logits=False)
            written = state.state()
            outputs.update((f"write_{pair.name_out}", written[pair.name_in]) for pair in pairs)
    return outputs


def _runner(engine: StepEngine, name: str, prefill: bool) -> Any:
    """``engine`` as a Polygraphy runner of one step."""
    import time

    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    config = engine.config

    class StepRunner(BaseRunner):
        def activate_impl(self) -> None:
            pass

        def deactivate_impl(self) -> None:
            pass

        def get_input_metadata_impl(self) -> Any:
            metadata = TensorMetadata()
            for tensor in variant(config, STEP).inputs:
                metadata.add(tensor.name, np.dtype(tensor.dtype),
                             tuple(None if isinstance(d, str) else d for d in tensor.shape))
            return metadata

        def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            started = time.perf_counter()
            outputs = {name: np.ascontiguousarray(value)  # Polygraphy views them
                       for name, value in step_outputs(engine, feed_dict, prefill).items()}
            self.inference_time = time.perf_counter() - started
            return outputs

    return StepRunner(name=name)


@dataclass(frozen=True)
class OpenLoopResult:
    """Per output: the largest absolute error of its finite values over all steps, the
    first failing step's segment and error, and its non-finite values (count, first
    segment)."""

    max_abs: dict[str, float]
    first_failure: dict[str, tuple[int, float]]
    non_finite: dict[str, tuple[int, int]]
    steps: int


def compare_open_loop(reference: StepEngine, candidate: StepEngine, steps: Sequence[Step],
                      atol: Mapping[str, float], rtol: Mapping[str, float]) -> OpenLoopResult:
    """Run both sides on every recorded step and judge each output with Polygraphy
    (``atol``/``rtol`` per output name, ``""`` the default; an output passes a step when
    its largest error is within atol or its largest relative error within rtol)."""
    from polygraphy.comparator import Comparator, SimpleCompareFunc

    from rmt_deploy.export.polygraphy_log import quiet

    prefill = PREFILL in reference.graphs and PREFILL in candidate.graphs
    runners = [_runner(reference, "reference", prefill),
               _runner(candidate, "candidate", prefill)]
    with quiet():
        results = Comparator.run(runners, data_loader=[step.feed for step in steps])
        accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(
            atol=dict(atol), rtol=dict(rtol), check_error_stat="max"))
    (iterations,) = accuracy[0].values()
    per_step = zip(*(runs for _, runs in results), strict=True)  # (reference, candidate)
    max_abs: dict[str, float] = {}
    first: dict[str, tuple[int, float]] = {}
    non_finite: dict[str, tuple[int, int]] = {}
    for step, outputs, sides in zip(steps, iterations, per_step, strict=True):
        for name, result in outputs.items():
            bad = sum(int(np.size(side[name]) - np.isfinite(side[name]).sum())
                      for side in sides)
            if bad:
                count, segment = non_finite.get(name, (0, step.segment))
                non_finite[name] = (count + bad, segment)
                continue
            error = float(result.max_absdiff)
            max_abs[name] = max(max_abs.get(name, 0.0), error)
            if not bool(result) and name not in first:
                first[name] = (step.segment, error)
    return OpenLoopResult(max_abs, first, non_finite, len(steps))
