"""Proof that an exported graph or engine reproduces its reference: ONNX checks, then
both run side by side over several batches, open loop (each step given the reference
state) and closed loop (each side feeding back its own state), and the gates that
judge the errors (non-finite values, max abs per output, state cosine, agreement)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rmt_deploy.contract import WRITE, state_pairs
from rmt_deploy.errors import ValidationError
from rmt_deploy.runtime.backends.base import EngineState, State, StepEngine
from rmt_deploy.runtime.loop import every_step, never, run_segments
from rmt_deploy.runtime.stepper import Stepper
from rmt_deploy.runtime.tokens import ArraySource, TokenSource
from rmt_deploy.segmentation import content_id_range, count_segments
from rmt_deploy.spec import RMTConfig

MODES = ("open_loop", "closed_loop")


@dataclass(frozen=True)
class Tolerance:
    """Largest absolute error allowed per output."""

    open_loop: float = 1e-4  # one step from the same memory
    closed_loop: float = 1e-3  # after every segment of a closed-loop run


@dataclass(frozen=True)
class DriftGates:
    """What a closed-loop run of a candidate against its reference must show, besides
    finite values everywhere."""

    min_agreement: float = 0.99  # share of predictions (argmax of the logits) equal
    min_memory_cosine: float = 0.99  # worst cosine of a memory slot at any segment
    max_abs: float | None = None  # largest error of any output (None: not bounded)


@dataclass
class ErrorStats:
    """Largest absolute error per output, the worst cosine of state slots (the last axis
    of every state pair: the memory's slots), which output had it, and how many
    values of each output were not finite on either side (those count in no other
    figure, so every figure stays a finite number). ``series`` holds the same figures per
    segment (the step of the run: the longest document's segment), set by ``segment``."""

    max_abs: dict[str, float] = field(default_factory=dict)
    min_memory_cosine: float = 1.0
    cosine_output: str = ""  # the state output the worst cosine was measured on
    agreeing: int = 0  # predictions (argmax of the logits) equal on both sides
    predictions: int = 0
    non_finite: dict[str, int] = field(default_factory=dict)
    segment: int = 0
    series: dict[str, list[float]] = field(default_factory=dict)

    def _record(self, key: str, value: float, neutral: float, worse=max) -> None:
        values = self.series.setdefault(key, [])
        values.extend([neutral] * (self.segment + 1 - len(values)))
        values[self.segment] = worse(values[self.segment], value)

    def update(self, name: str, expected: np.ndarray, actual: np.ndarray) -> None:
        expected, actual = expected.astype(np.float64), actual.astype(np.float64)
        finite = np.isfinite(expected) & np.isfinite(actual)
        bad = int(finite.size - finite.sum())
        self.non_finite[name] = self.non_finite.get(name, 0) + bad
        error = float(np.max(np.abs(expected - actual)[finite], initial=0.0))
        self.max_abs[name] = max(self.max_abs.get(name, 0.0), error)
        self._record(f"max_abs/{name}", error, 0.0)
        self._record(f"non_finite/{name}", bad, 0)

    def update_memory(self, expected: np.ndarray, actual: np.ndarray, name: str) -> None:
        """A state output: its errors and the cosine of its slots."""
        self.update(name, expected, actual)
        a, b = expected.astype(np.float64), actual.astype(np.float64)
        finite = (np.isfinite(a) & np.isfinite(b)).all(-1)
        a, b = a[finite], b[finite]
        cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
                                    + 1e-30)
        worst = float(cosine.min(initial=1.0))
        if worst < self.min_memory_cosine or not self.cosine_output:
            self.cosine_output = name
        self.min_memory_cosine = min(self.min_memory_cosine, worst)
        self._record("memory_cosine", worst, 1.0, min)

    def update_agreement(self, expected: np.ndarray, actual: np.ndarray) -> None:
        same = expected.argmax(-1) == actual.argmax(-1)
        self.agreeing += int(same.sum())
        self.predictions += int(same.size)
        self._record("disagreeing", int(same.size - same.sum()), 0, lambda a, b: a + b)

    @property
    def agreement(self) -> float:
        return self.agreeing / self.predictions if self.predictions else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs": self.max_abs, "min_memory_cosine": self.min_memory_cosine,
                "cosine_output": self.cosine_output, "agreement": self.agreement,
                "non_finite": self.non_finite}


def check_onnx(path: Path) -> None:
    """ONNX checker and strict shape inference."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
        onnx.shape_inference.infer_shapes_path(str(path), str(path) + ".inferred", strict_mode=True)
    except Exception as error:  # onnx raises several unexported types
        raise ValidationError(f"{path.name}: fails the ONNX checks: "
                              f"{str(error).splitlines()[0][:200]}") from None
    finally:
        Path(str(path) + ".inferred").unlink(missing_ok=True)


REFERENCE, CANDIDATE = "reference/", "candidate/"


def _side(state: Mapping[str, np.ndarray], prefix: str) -> State:
    return {name[len(prefix):]: array for name, array in state.items()
            if name.startswith(prefix)}


class _Paired(StepEngine):
    """Runs the reference and the candidate in lockstep and records their differences.

    Its state holds both sides' states, every pair named with its side's prefix
    (``reference/``, ``candidate/``), so the stepper's per-row bookkeeping carries each
    side's own state. In open loop the candidate is given the reference's state before
    every step.
    """

    name = "paired"

    def __init__(self, reference: StepEngine, candidate: StepEngine, closed_loop: bool):
        self.config = reference.config
        self.reference, self.candidate = reference, candidate
        self.closed_loop = closed_loop
        self.stats = ErrorStats()
        self.steps = 0  # steps of the current run

    def new_state(self, state: Mapping[str, np.ndarray]) -> _PairedState:
        return _PairedState(self, self.reference.new_state(_side(state, REFERENCE)),
                            self.candidate.new_state(_side(state, CANDIDATE)))


class _PairedState(EngineState):
    def __init__(self, paired: _Paired, reference: EngineState, candidate: EngineState):
        super().__init__(reference.batch)
        self._paired, self.reference, self.candidate = paired, reference, candidate

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        self.reference.load(_side(state, REFERENCE))
        self.candidate.load(_side(state, CANDIDATE))

    def state(self) -> State:
        return {**{REFERENCE + k: v for k, v in self.reference.state().items()},
                **{CANDIDATE + k: v for k, v in self.candidate.state().items()}}

    def _compare_state(self, prefix: str = "") -> None:
        expected, actual = self.reference.state(), self.candidate.state()
        for pair in state_pairs(self._paired.config):
            self._paired.stats.update_memory(expected[pair.name_in], actual[pair.name_in],
                                             prefix + pair.name_out)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             logits: bool = True) -> np.ndarray | None:
        """The step of both sides; with ``logits=False`` the candidate runs its write
        graph and only the state is compared (as ``write_`` + each state output)."""
        paired, stats = self._paired, self._paired.stats
        stats.segment = paired.steps
        paired.steps += 1
        if not paired.closed_loop:
            self.candidate.load(self.reference.state())
        if not logits:
            self.reference.step(input_ids, attention_mask)
            self.candidate.step(input_ids, attention_mask, logits=False)
            self._compare_state("write_")
            return None
        expected = self.reference.step(input_ids, attention_mask)
        actual = self.candidate.step(input_ids, attention_mask)
        if not paired.config.is_encoder:  # padded positions' logits are not used
            keep = attention_mask.astype(bool)
            expected, actual = expected[keep], actual[keep]
        stats.update("logits", expected, actual)
        stats.update_agreement(expected, actual)
        self._compare_state()
        return expected

    def close(self) -> None:
        self.reference.close()
        self.candidate.close()
        super().close()


def validation_batches(config: RMTConfig, segments: int, seed: int = 0) -> list[list[np.ndarray]]:
    """Documents that exercise batch 1 and 3, padded rows, rows that skip steps, and
    short first/last segments; the longest runs ``segments`` segments."""
    rng = np.random.default_rng(seed)
    low, high = content_id_range(config)
    size = config.segment_size

    def doc(n: int) -> np.ndarray:
        return rng.integers(low, high, n)

    return [
        [doc(segments * size), doc((segments // 2) * size + max(1, size // 2)), doc(3)],
        [doc(5 * size + 1)],
    ]


def compare(reference: StepEngine, candidate: StepEngine, initial_state: State,
            segments: int = 32, modes: tuple[str, ...] = MODES,
            batches: Sequence[Sequence[TokenSource]] | None = None,
            candidate_state: State | None = None, series: bool = False,
            progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Open- and closed-loop errors of ``candidate`` against ``reference``, over
    ``batches`` of documents (default: :func:`validation_batches` of ``segments``);
    ``segments`` in the result is the longest run's. Where the candidate has a write
    graph, each mode runs the documents twice: through its step graph, then through its
    write graph (``write_`` + each state output). Each side starts from ``initial_state``
    (one row's), or the candidate from its own ``candidate_state``. With ``series``,
    ``result["series"]`` holds each mode's figures per segment (what the gates use to name
    the first segment that fails). ``progress(steps_done, steps_total)`` is called after
    every step."""
    config = reference.config
    if batches is None:
        batches = [[ArraySource(d, config) for d in docs]
                   for docs in validation_batches(config, segments)]
    else:
        segments = max(count_segments(len(source), config)
                       for sources in batches for source in sources)
    results: dict[str, Any] = {}
    both = {**{REFERENCE + k: v for k, v in initial_state.items()},
            **{CANDIDATE + k: v for k, v in (candidate_state or initial_state).items()}}
    passes = [every_step] + ([never] if WRITE in candidate.graphs else [])
    per_segment = {}
    total = len(modes) * len(passes) * sum(
        max(count_segments(len(source), config) for source in sources) for sources in batches)
    done = 0

    def step_done(*_args) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    for mode in modes:
        paired = _Paired(reference, candidate, closed_loop=mode == "closed_loop")
        for wants_logits, sources in itertools.product(passes, batches):
            paired.steps = 0
            with Stepper(paired) as stepper:
                for row in range(len(sources)):
                    stepper.add(row, both)
                run_segments(stepper, sources, step_done, wants_logits=wants_logits)
        results[mode] = paired.stats.to_dict()
        per_segment[mode] = paired.stats.series
    results["segments"] = segments
    results["batches"] = [len(sources) for sources in batches]
    if series:
        results["series"] = per_segment
    return results


# ---------------------------------------------------------------- the gates


@dataclass(frozen=True)
class Failure:
    """One gate a comparison failed: what, where first, by how much."""

    gate: str  # "non_finite", "max_abs", "memory_cosine" or "agreement"
    mode: str  # "open_loop" or "closed_loop"
    output: str
    segment: int | None  # the first segment where it failed, where per-segment figures exist
    value: float
    limit: float

    def describe(self, what: str, reference: str = "the reference") -> str:
        where = f" (first at segment {self.segment})" if self.segment is not None else ""
        loop = self.mode.replace("_", " ")
        if self.gate == "non_finite":
            return (f"{what}: {int(self.value)} value(s) of {self.output} are NaN or infinite "
                    f"in the {loop} run{where}; the weights or the graph are damaged (check "
                    "the checkpoint for NaN/Inf weights)")
        if self.gate == "max_abs":
            return (f"{what}: {loop} error on {self.output} is {self.value:.3g}, above the "
                    f"tolerance {self.limit:g}{where}")
        if self.gate == "memory_cosine":
            return (f"{what}: {loop} memory cosine falls to {self.value:.6f}, below "
                    f"{self.limit:g}{where}: its memory drifts away from the reference's")
        return (f"{what} agrees with {reference} on {self.value:.2%} of {loop} predictions, "
                f"below {self.limit * 100:g}%{where}: it would lose accuracy")


def _first(results: dict[str, Any], mode: str, key: str, failed) -> int | None:
    values = results.get("series", {}).get(mode, {}).get(key)
    if values is None:
        return None
    return next((segment for segment, value in enumerate(values) if failed(value)), None)


def non_finite_failures(results: dict[str, Any]) -> list[Failure]:
    """NaN or infinity on either side, per mode and output."""
    return [Failure("non_finite", mode, name, _first(results, mode, f"non_finite/{name}",
                                                     lambda v: v > 0), count, 0)
            for mode in MODES for name, count in results.get(mode, {}).get("non_finite",
                                                                            {}).items()
            if count]


def max_abs_failures(results: dict[str, Any], mode: str, limit: float) -> list[Failure]:
    """Outputs whose largest error in ``mode`` is above ``limit``."""
    return [Failure("max_abs", mode, name, _first(results, mode, f"max_abs/{name}",
                                                  lambda v: not v <= limit), error, limit)
            for name, error in results[mode]["max_abs"].items() if not error <= limit]


def cosine_failures(results: dict[str, Any], mode: str, minimum: float) -> list[Failure]:
    """The state, when its worst slot cosine in ``mode`` is below ``minimum``."""
    cosine = results[mode]["min_memory_cosine"]
    if cosine >= minimum:
        return []
    return [Failure("memory_cosine", mode, results[mode].get("cosine_output", "state"), _first(
        results, mode, "memory_cosine", lambda v: v < minimum), cosine, minimum)]


def agreement_failures(results: dict[str, Any], mode: str, minimum: float) -> list[Failure]:
    """The logits, when their predictions agree less often than ``minimum`` in ``mode``."""
    agreement = results[mode]["agreement"]
    if agreement >= minimum:
        return []
    return [Failure("agreement", mode, "logits", _first(results, mode, "disagreeing",
                                                        lambda v: v > 0), agreement, minimum)]


def drift_failures(results: dict[str, Any], gates: DriftGates) -> list[Failure]:
    """Every gate of ``gates`` the closed-loop run fails, non-finite values first."""
    failures = non_finite_failures(results)
    if gates.max_abs is not None:
        failures += max_abs_failures(results, "closed_loop", gates.max_abs)
    failures += cosine_failures(results, "closed_loop", gates.min_memory_cosine)
    return failures + agreement_failures(results, "closed_loop", gates.min_agreement)


def _raise_first(failures: list[Failure], what: str, advice: str = "",
                 reference: str = "the reference") -> None:
    if failures:
        raise ValidationError(failures[0].describe(what, reference) + advice)


def enforce_finite(results: dict[str, Any], what: str) -> None:
    """Raise ValidationError when either side produced NaN or infinity anywhere."""
    _raise_first(non_finite_failures(results), what)


def enforce_agreement(results: dict[str, Any], minimum: float, what: str) -> None:
    """Raise ValidationError when a reduced-precision graph produced non-finite values or
    its closed-loop predictions agree with FP32 less often than ``minimum``."""
    enforce_finite(results, what)
    _raise_first(agreement_failures(results, "closed_loop", minimum), what,
                 f" over {results['segments']} segments; export FP32 only", "FP32")


def enforce_drift(results: dict[str, Any], gates: DriftGates, what: str, advice: str = "",
                  reference: str = "the reference") -> None:
    """Raise ValidationError on the first gate of ``gates`` the closed-loop run fails."""
    _raise_first(drift_failures(results, gates), what, advice, reference)


def enforce(results: dict[str, Any], tolerance: Tolerance) -> None:
    """Raise ValidationError when any value is not finite or any error exceeds its
    tolerance."""
    enforce_finite(results, "validation")
    for mode, limit in (("open_loop", tolerance.open_loop),
                        ("closed_loop", tolerance.closed_loop)):
        _raise_first(max_abs_failures(results, mode, limit), "validation",
                     "; the exported graph does not reproduce the reference (loosen "
                     "explicitly with --atol / --closed-loop-atol)")
