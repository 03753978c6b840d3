"""The one comparator: a candidate engine against its reference, both run side by side
over batches of documents, open loop (each step given the reference's state) and closed
loop (each side feeding back its own state). It returns a typed :class:`Comparison`
that export validation, the FP16/INT8/TensorRT judgements and ``rmt-compare`` all judge
(the gates are in :mod:`rmt_deploy.export.validate`)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rmt_deploy.contract import LOGITS, PREFILL, WRITE, state_pairs
from rmt_deploy.runtime.backends.base import EngineState, State, StepEngine
from rmt_deploy.runtime.loop import every_step, never, run_segments
from rmt_deploy.runtime.stepper import Stepper
from rmt_deploy.runtime.tokens import ArraySource, TokenSource
from rmt_deploy.segmentation import content_id_range, count_segments
from rmt_deploy.spec import RMTConfig

OPEN_LOOP, CLOSED_LOOP = "open_loop", "closed_loop"
MODES = (OPEN_LOOP, CLOSED_LOOP)
WRITTEN = "write_"  # prefix of the state outputs of a candidate's write graph
PREFILL_LOGITS = "prefill_logits"  # a decoder's prefill graph's logits (open loop, asked)

#: ``judge(expected, actual)``: whether each output of one open-loop step is within its
#: tolerance (only outputs finite on both sides are given).
OutputJudge = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], Mapping[str, bool]]


#: A running sum's slot below this share of its largest slot's norm has no direction.
NEGLIGIBLE = 1e-3


def _record(values: list, segment: int, value: Any, neutral: Any, worse=max) -> None:
    values.extend([neutral] * (segment + 1 - len(values)))
    values[segment] = worse(values[segment], value)


#: Values compared at a time: a full vocabulary's logits (a Llama's 128k x 1k positions x
#: 3 rows: 1.6 GB) would otherwise be copied to FP64 whole, several times over.
BLOCK = 1 << 20


def _elementwise(expected: np.ndarray, actual: np.ndarray) -> tuple[float, float, int]:
    """The largest absolute error, the largest ``|expected|`` (both where both sides are
    finite) and how many values are not finite on either side, in FP64 a block at a
    time."""
    error = scale = 0.0
    bad = 0
    expected, actual = expected.reshape(-1), actual.reshape(-1)
    for start in range(0, expected.size, BLOCK):
        a = expected[start:start + BLOCK].astype(np.float64)
        b = actual[start:start + BLOCK].astype(np.float64)
        finite = np.isfinite(a) & np.isfinite(b)
        bad += int(finite.size - finite.sum())
        error = max(error, float(np.max(np.abs(a - b)[finite], initial=0.0)))
        scale = max(scale, float(np.max(np.abs(a)[finite], initial=0.0)))
    return error, scale, bad


@dataclass
class SegmentSeries:
    """A mode's figures per segment (the step of a run: the longest document's segment),
    the worst over its rows and batches: what the gates name the first failing segment
    by."""

    max_abs: dict[str, list[float]] = field(default_factory=dict)
    non_finite: dict[str, list[int]] = field(default_factory=dict)
    memory_cosine: dict[str, list[float]] = field(default_factory=dict)  # per state output
    disagreeing: list[int] = field(default_factory=list)  # predictions not equal
    rejected: dict[str, list[bool]] = field(default_factory=dict)  # by the judge, if any

    def worst_memory_cosine(self) -> list[float]:
        """Per segment, the worst slot cosine of any state output."""
        columns = itertools.zip_longest(*self.memory_cosine.values(), fillvalue=1.0)
        return [min(column) for column in columns]

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs": self.max_abs, "non_finite": self.non_finite,
                "memory_cosine": self.memory_cosine, "disagreeing": self.disagreeing,
                "rejected": self.rejected}


@dataclass
class LoopErrors:
    """One mode's errors of the candidate: the largest absolute error per output, the
    worst cosine of state slots (the last axis of every state output) per state output,
    prediction agreement (argmax of the logits), and how many values of each output were
    not finite on either side (those count in no other figure, so every figure stays a
    finite number); ``series`` holds the same per segment."""

    mode: str  # OPEN_LOOP, CLOSED_LOOP (or "generation": validate_generation's steps)
    max_abs: dict[str, float] = field(default_factory=dict)
    non_finite: dict[str, int] = field(default_factory=dict)
    memory_cosine: dict[str, float] = field(default_factory=dict)  # per state output
    scale: dict[str, float] = field(default_factory=dict)  # largest |reference| per output
    scaled: set[str] = field(default_factory=set)  # outputs of scaled state pairs
    agreeing: int = 0  # predictions equal on both sides
    predictions: int = 0
    steps: int = 0  # steps through the step graph (a write graph's are not counted)
    series: SegmentSeries = field(default_factory=SegmentSeries)

    @property
    def agreement(self) -> float:
        return self.agreeing / self.predictions if self.predictions else 1.0

    @property
    def min_memory_cosine(self) -> float:
        return min(self.memory_cosine.values(), default=1.0)

    @property
    def cosine_output(self) -> str:
        """The state output the worst cosine was measured on."""
        return min(self.memory_cosine, key=self.memory_cosine.get, default="")

    def record(self, segment: int, expected: Mapping[str, np.ndarray],
               actual: Mapping[str, np.ndarray], states: set[str],
               judge: OutputJudge | None = None) -> None:
        """One step's outputs of both sides at ``segment``; ``states`` names the state
        outputs among them."""
        series = self.series
        finite_expected, finite_actual = {}, {}  # what the judge sees
        for name, reference in expected.items():
            error, scale, bad = _elementwise(reference, actual[name])
            self.scale[name] = max(self.scale.get(name, 0.0), scale)
            self.non_finite[name] = self.non_finite.get(name, 0) + bad
            self.max_abs[name] = max(self.max_abs.get(name, 0.0), error)
            _record(series.non_finite.setdefault(name, []), segment, bad, 0)
            _record(series.max_abs.setdefault(name, []), segment, error, 0.0)
            if not bad:
                finite_expected[name], finite_actual[name] = reference, actual[name]
            if name in states:
                self._record_cosine(segment, name, reference.astype(np.float64),
                                    actual[name].astype(np.float64))
            if name == LOGITS:
                self._record_agreement(segment, reference, actual[name])
        if judge is not None and finite_expected:
            for name, passed in judge(finite_expected, finite_actual).items():
                _record(series.rejected.setdefault(name, []), segment, not passed, False,
                        lambda a, b: a or b)

    def _record_cosine(self, segment: int, name: str, a: np.ndarray, b: np.ndarray) -> None:
        finite = (np.isfinite(a) & np.isfinite(b)).all(-1)
        a, b = a[finite], b[finite]
        norm_a, norm_b = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
        cosine = (a * b).sum(-1) / (norm_a * norm_b + 1e-30)
        # slots negligible on both sides have no direction to compare and count as equal:
        # both zero, or in a running sum (an armt's A, z) below NEGLIGIBLE of its largest
        # slot (FP16 rounding leaves ~1e-5 where FP32 cancels an unwritten key to 0)
        floor = NEGLIGIBLE * float(norm_a.max(initial=0.0)) if name in self.scaled else 0.0
        cosine[(norm_a <= floor) & (norm_b <= floor)] = 1.0
        worst = float(cosine.min(initial=1.0))
        self.memory_cosine[name] = min(self.memory_cosine.get(name, 1.0), worst)
        _record(self.series.memory_cosine.setdefault(name, []), segment, worst, 1.0, min)

    def _record_agreement(self, segment: int, expected: np.ndarray, actual: np.ndarray) -> None:
        same = expected.argmax(-1) == actual.argmax(-1)
        self.agreeing += int(same.sum())
        self.predictions += int(same.size)
        _record(self.series.disagreeing, segment, int(same.size - same.sum()), 0,
                lambda a, b: a + b)

    def summary(self) -> str:
        """The figures in one line (for logs)."""
        errors = ", ".join(f"{name} {error:.2e}" for name, error in self.max_abs.items())
        return (f"max abs error {errors}; memory cosine >= {self.min_memory_cosine:.6f}; "
                f"predictions agree {self.agreement:.2%}")

    def to_dict(self) -> dict[str, Any]:
        """The figures as the manifest records them (without the series)."""
        return {"max_abs": self.max_abs, "min_memory_cosine": self.min_memory_cosine,
                "cosine_output": self.cosine_output, "agreement": self.agreement,
                "non_finite": self.non_finite}


@dataclass
class Comparison:
    """A candidate against its reference: the errors of each mode run, over
    ``segments`` (the longest document's) in batches of ``batches`` rows."""

    open_loop: LoopErrors | None
    closed_loop: LoopErrors | None
    segments: int
    batches: list[int]

    @property
    def loops(self) -> list[LoopErrors]:
        """The modes that ran, open loop first."""
        return [loop for loop in (self.open_loop, self.closed_loop) if loop is not None]

    def to_dict(self) -> dict[str, Any]:
        """The record written into the manifest: each mode's figures, segments, batches."""
        return {**{loop.mode: loop.to_dict() for loop in self.loops},
                "segments": self.segments, "batches": self.batches}


REFERENCE, CANDIDATE = "reference/", "candidate/"


def _side(state: Mapping[str, np.ndarray], prefix: str) -> State:
    return {name[len(prefix):]: array for name, array in state.items()
            if name.startswith(prefix)}


class _Paired(StepEngine):
    """Runs the reference and the candidate in lockstep and records their differences
    into ``errors``.

    Its state holds both sides' states, every pair named with its side's prefix
    (``reference/``, ``candidate/``), so the stepper's per-row bookkeeping carries each
    side's own state. In open loop the candidate is given the reference's state before
    every step.
    """

    name = "paired"

    def __init__(self, reference: StepEngine, candidate: StepEngine, mode: str,
                 judge: OutputJudge | None, prefill: bool):
        self.config = reference.config
        self.reference, self.candidate = reference, candidate
        self.errors = LoopErrors(mode)
        self.judge = judge if mode == OPEN_LOOP else None
        self.prefill = prefill and mode == OPEN_LOOP
        self.segment = 0  # the recurrence step of the current run
        self._counted = False  # whether the segment's open-loop step is counted
        self.start_run()
        # the most rows both sides take at once (a TensorRT profile): the stepper splits
        # larger steps into parts, which record as one segment
        self.max_batch = rows_at_once(reference, candidate)

    def start_run(self) -> None:
        """The next step is a run's first segment."""
        self._segments = itertools.count()

    def next_segment(self, _rows: Sequence[int] = ()) -> None:
        """The next steps (one, or the parts the stepper splits one into) are the run's
        next segment (``run_segments``' ``before_step``)."""
        self.segment, self._counted = next(self._segments), False

    def count_step(self) -> None:
        """Count the segment's step once, however many parts it ran in."""
        if not self._counted:
            self.errors.steps += 1
            self._counted = True

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

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             logits: bool = True) -> None:
        """The step of both sides, their outputs recorded: the logits (a decoder's
        padded positions left out: they are not used) and each state output; with
        ``logits=False`` the candidate runs its write graph and only the state is
        compared (as ``write_`` + each state output). It returns no logits: they are
        read here, and a full vocabulary's (1.6 GB a step for a Llama's 128k at 3 rows
        of 1k positions) is freed as soon as it is."""
        paired = self._paired
        segment = paired.segment
        if paired.errors.mode == OPEN_LOOP:
            self.candidate.load(self.reference.state())
        expected: dict[str, np.ndarray] = {}
        actual: dict[str, np.ndarray] = {}
        sides = ((self.reference, expected), (self.candidate, actual))
        if logits and paired.prefill:
            for side, outputs in sides:
                outputs[PREFILL_LOGITS] = side.prefill(input_ids, attention_mask)[0]
        if logits:
            keep = (slice(None) if paired.config.is_encoder
                    else attention_mask.astype(bool))
            expected[LOGITS] = self.reference.step(input_ids, attention_mask)[keep]
            actual[LOGITS] = self.candidate.step(input_ids, attention_mask)[keep]
            paired.count_step()
        else:
            self.reference.step(input_ids, attention_mask)
            self.candidate.step(input_ids, attention_mask, logits=False)
        prefix = "" if logits else WRITTEN
        pairs = state_pairs(paired.config)
        for side, outputs in sides:
            state = side.state()
            outputs.update((prefix + pair.name_out, state[pair.name_in]) for pair in pairs)
        paired.errors.scaled.update(prefix + pair.name_out for pair in pairs if pair.scaled)
        paired.errors.record(segment, expected, actual,
                             {prefix + pair.name_out for pair in pairs}, paired.judge)

    def close(self) -> None:
        self.reference.close()
        self.candidate.close()
        super().close()


def rows_at_once(*engines: StepEngine) -> int | None:
    """The most rows every one of ``engines`` takes in one step (None: no limit)."""
    return min((engine.max_batch for engine in engines if engine.max_batch is not None),
               default=None)


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
            candidate_state: State | None = None, judge: OutputJudge | None = None,
            prefill: bool = False,
            progress: Callable[[int, int], None] | None = None) -> Comparison:
    """Open- and closed-loop errors of ``candidate`` against ``reference``, over
    ``batches`` of documents (default: :func:`validation_batches` of ``segments``);
    ``segments`` in the result is the longest run's. Where the candidate has a write
    graph, each mode runs the documents twice: through its step graph, then through its
    write graph (``write_`` + each state output). Each side starts from ``initial_state``
    (one row's), or the candidate from its own ``candidate_state``. In open loop,
    ``judge`` (if given) judges every step's outputs, and with ``prefill`` (where both
    sides have a prefill graph) each step's prefill logits are compared too
    (``prefill_logits``). ``progress(steps_done, steps_total)`` is called after every
    step."""
    config = reference.config
    if batches is None:
        batches = [[ArraySource(d, config) for d in docs]
                   for docs in validation_batches(config, segments)]
    else:
        segments = max(count_segments(len(source), config)
                       for sources in batches for source in sources)
    both = {**{REFERENCE + k: v for k, v in initial_state.items()},
            **{CANDIDATE + k: v for k, v in (candidate_state or initial_state).items()}}
    prefill = prefill and PREFILL in reference.graphs and PREFILL in candidate.graphs
    passes = [every_step] + ([never] if WRITE in candidate.graphs else [])
    total = len(modes) * len(passes) * sum(
        max(count_segments(len(source), config) for source in sources) for sources in batches)
    done = 0

    def step_done(*_args) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    loops = {}
    for mode in modes:
        paired = _Paired(reference, candidate, mode, judge, prefill)
        for wants_logits, sources in itertools.product(passes, batches):
            paired.start_run()
            with Stepper(paired) as stepper:
                for row in range(len(sources)):
                    stepper.add(row, both)
                run_segments(stepper, sources, step_done, wants_logits=wants_logits,
                             before_step=paired.next_segment)
        loops[mode] = paired.errors
    return Comparison(loops.get(OPEN_LOOP), loops.get(CLOSED_LOOP), segments,
                      [len(sources) for sources in batches])
