"""Proof that an exported graph or engine reproduces its reference: the ONNX checks,
and the gates that judge a :class:`~rmt_deploy.export.comparator.Comparison` (non-finite
values, max abs per output, state cosine, agreement), each naming the first output and
segment that fail."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from rmt_deploy.errors import ValidationError
from rmt_deploy.export.comparator import Comparison, LoopErrors


@dataclass(frozen=True)
class Tolerance:
    """Largest absolute error allowed per output."""

    open_loop: float = 1e-4  # one step from the same memory
    closed_loop: float = 1e-3  # after every segment of a closed-loop run


#: Worst closed-loop cosine allowed to each slot of each state pair of an ARMT (every
#: layer's A.i and z.i, the running sums), per precision of the candidate graph: FP32
#: against PyTorch is tight, FP16 and INT8 against FP32 looser. An RMT's memory keeps
#: its own gates (``DriftGates.min_memory_cosine``, ``--min-memory-cosine``).
STATE_COSINE: dict[str, float] = {"fp32": 0.9999, "fp16": 0.99, "int8": 0.99}


@dataclass(frozen=True)
class DriftGates:
    """What a closed-loop run of a candidate against its reference must show, besides
    finite values everywhere."""

    min_agreement: float = 0.99  # share of predictions (argmax of the logits) equal
    min_memory_cosine: float = 0.99  # worst cosine of a memory slot at any segment
    max_abs: float | None = None  # largest error of any output (None: not bounded)


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


# ---------------------------------------------------------------- the gates


@dataclass(frozen=True)
class Failure:
    """One gate a comparison failed: what, where first, by how much."""

    gate: str  # "non_finite", "max_abs", "memory_cosine", "state_cosine" or "agreement"
    mode: str  # "open_loop" or "closed_loop"
    output: str
    segment: int | None  # the first segment where it failed (None: no one segment did)
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
            return (f"{what}: {loop} memory cosine of {self.output} falls to {self.value:.6f}, "
                    f"below {self.limit:g}{where}: its state drifts away from the reference's")
        if self.gate == "state_cosine":
            return (f"{what}: {loop} cosine of state {self.output} falls to {self.value:.6f}, "
                    f"below {self.limit:g}{where}: that state drifts away from "
                    f"{reference}'s")
        return (f"{what} agrees with {reference} on {self.value:.2%} of {loop} predictions, "
                f"below {self.limit * 100:g}%{where}: it would lose accuracy")


def _first(values: Sequence, failed: Callable[[float], bool]) -> int | None:
    """The first segment whose figure fails; None where none does alone (an agreement
    gate above 100%)."""
    return next((segment for segment, value in enumerate(values) if failed(value)), None)


def non_finite_failures(comparison: Comparison) -> list[Failure]:
    """NaN or infinity on either side, per mode and output."""
    return [Failure("non_finite", loop.mode, name,
                    _first(loop.series.non_finite[name], lambda v: v > 0), count, 0)
            for loop in comparison.loops for name, count in loop.non_finite.items() if count]


def max_abs_failures(loop: LoopErrors, limit: float) -> list[Failure]:
    """Outputs whose largest error in ``loop`` is above ``limit``; for a scaled state
    output (a running sum), above ``limit`` times its largest value where that exceeds 1."""
    failures = []
    for name, error in loop.max_abs.items():
        bound = limit * max(1.0, loop.scale.get(name, 1.0)) if name in loop.scaled else limit
        if not error <= bound:
            failures.append(Failure("max_abs", loop.mode, name, _first(
                loop.series.max_abs[name], lambda v, b=bound: not v <= b), error, bound))
    return failures


def rejected_failures(loop: LoopErrors, limit: Callable[[str], float]) -> list[Failure]:
    """Outputs the comparison's judge rejected at some step of ``loop`` (its largest error
    at the first such segment; ``limit(name)``: the output's atol, for the message)."""
    failures = []
    for name, rejected in loop.series.rejected.items():
        if any(rejected):
            segment = rejected.index(True)
            failures.append(Failure("max_abs", loop.mode, name, segment,
                                    loop.series.max_abs[name][segment], limit(name)))
    return failures


def cosine_failures(loop: LoopErrors, minimum: float) -> list[Failure]:
    """The state outputs whose worst slot cosine in ``loop`` is below ``minimum``."""
    return [Failure("memory_cosine", loop.mode, name,
                    _first(loop.series.memory_cosine[name], lambda v: v < minimum), cosine,
                    minimum)
            for name, cosine in loop.memory_cosine.items() if cosine < minimum]


def state_cosine_failures(loop: LoopErrors, minimum: float) -> list[Failure]:
    """Each state pair whose worst slot cosine in ``loop`` is below ``minimum``, per
    pair."""
    return [replace(failure, gate="state_cosine")
            for failure in cosine_failures(loop, minimum)]


def agreement_failures(loop: LoopErrors, minimum: float) -> list[Failure]:
    """The logits, when their predictions agree less often than ``minimum`` in ``loop``."""
    agreement = loop.agreement
    if agreement >= minimum:
        return []
    return [Failure("agreement", loop.mode, "logits",
                    _first(loop.series.disagreeing, lambda v: v > 0), agreement, minimum)]


def closed_loop_failures(loop: LoopErrors, gates: DriftGates) -> list[Failure]:
    """Every gate of ``gates`` the closed-loop run ``loop`` fails (finite values aside)."""
    failures = [] if gates.max_abs is None else max_abs_failures(loop, gates.max_abs)
    failures += cosine_failures(loop, gates.min_memory_cosine)
    return failures + agreement_failures(loop, gates.min_agreement)


def drift_failures(comparison: Comparison, gates: DriftGates) -> list[Failure]:
    """Every gate of ``gates`` the closed-loop run fails, non-finite values first."""
    return non_finite_failures(comparison) + closed_loop_failures(comparison.closed_loop,
                                                                  gates)


def _raise_first(failures: list[Failure], what: str, advice: str = "",
                 reference: str = "the reference") -> None:
    if failures:
        raise ValidationError(failures[0].describe(what, reference) + advice)


def enforce_finite(comparison: Comparison, what: str) -> None:
    """Raise ValidationError when either side produced NaN or infinity anywhere."""
    _raise_first(non_finite_failures(comparison), what)


def enforce_agreement(comparison: Comparison, minimum: float, what: str) -> None:
    """Raise ValidationError when a reduced-precision graph produced non-finite values or
    its closed-loop predictions agree with FP32 less often than ``minimum``."""
    enforce_finite(comparison, what)
    _raise_first(agreement_failures(comparison.closed_loop, minimum), what,
                 f" over {comparison.segments} segments; export FP32 only", "FP32")


def enforce_drift(comparison: Comparison, gates: DriftGates, what: str, advice: str = "",
                  reference: str = "the reference") -> None:
    """Raise ValidationError on the first gate of ``gates`` the closed-loop run fails."""
    _raise_first(drift_failures(comparison, gates), what, advice, reference)


def enforce_states(comparison: Comparison, precision: str, what: str,
                   reference: str = "the reference") -> None:
    """Raise ValidationError when a state pair's closed-loop cosine falls below the
    tolerance of ``precision`` (:data:`STATE_COSINE`)."""
    _raise_first(state_cosine_failures(comparison.closed_loop, STATE_COSINE[precision]),
                 what, reference=reference)


def enforce(comparison: Comparison, tolerance: Tolerance) -> None:
    """Raise ValidationError when any value is not finite or any error exceeds its
    tolerance."""
    enforce_finite(comparison, "validation")
    for loop, limit in ((comparison.open_loop, tolerance.open_loop),
                        (comparison.closed_loop, tolerance.closed_loop)):
        _raise_first(max_abs_failures(loop, limit), "validation",
                     "; the exported graph does not reproduce the reference (loosen "
                     "explicitly with --atol / --closed-loop-atol)")
