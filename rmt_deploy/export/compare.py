"""``rmt-compare``: any artifacts of one model against a reference artifact, on the same
documents, through the comparator export validation uses: open loop (each step from the
reference's memory, every output within its atol/rtol, judged by Polygraphy) and closed
loop (each side feeding back its own memory: max abs, memory cosine, prediction
agreement), with a verdict that names the first output and segment that fail."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmt_deploy.errors import ConfigError
from rmt_deploy.export.artifacts import Artifact, check_same_model, open_artifact
from rmt_deploy.export.comparator import Comparison, compare, validation_batches
from rmt_deploy.export.polygraphy_judge import PolygraphyJudge
from rmt_deploy.export.validate import (
    DriftGates,
    Failure,
    closed_loop_failures,
    non_finite_failures,
    rejected_failures,
)
from rmt_deploy.runtime.options import idle_cpus
from rmt_deploy.runtime.tokens import ArraySource, TokenSource

if TYPE_CHECKING:
    from rmt_deploy.model.checkpoint import AuthorsOptions


@dataclass(frozen=True)
class CompareOptions:
    """What to run and how strictly to judge it."""

    segments: int = 64  # the longest document's segments (closed loop)
    seed: int = 0  # of the random documents
    atol: Mapping[str, float] = field(default_factory=lambda: {"": 1e-4})  # open loop
    rtol: Mapping[str, float] = field(default_factory=lambda: {"": 1e-5})  # open loop
    closed_loop_atol: float = 1e-3  # largest closed-loop error of any output
    min_memory_cosine: float = 0.999  # worst closed-loop memory slot cosine
    min_agreement: float = 0.99  # closed-loop predictions equal
    backend: str | None = None  # for export folders and graphs
    authors: AuthorsOptions | None = None  # for authors' checkpoints
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.segments < 2:
            raise ConfigError(f"segments {self.segments}: compare at least 2 segments")
        for name, values in (("atol", self.atol), ("rtol", self.rtol)):
            if any(not 0 <= value < math.inf for value in values.values()):
                raise ConfigError(f"{name} {dict(values)}: tolerances must be finite and >= 0")
        for name, value, low, high in (
                ("closed_loop_atol", self.closed_loop_atol, 0, math.inf),
                ("min_memory_cosine", self.min_memory_cosine, -1, 1),
                ("min_agreement", self.min_agreement, 0, 1)):
            if not (math.isfinite(value) and low <= value <= high):
                raise ConfigError(f"{name} {value}: must be a finite number in [{low}, {high}]")

    @property
    def gates(self) -> DriftGates:
        return DriftGates(self.min_agreement, self.min_memory_cosine, self.closed_loop_atol)


@dataclass
class Judged:
    """One candidate against the reference: its comparison and the gates it failed."""

    candidate: str  # label: file (backend precision)
    errors: Comparison  # both modes
    failures: list[Failure]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        opened, closed = self.errors.open_loop, self.errors.closed_loop
        return {
            "candidate": self.candidate, "passed": self.passed,
            "open_loop": {"steps": opened.steps, "max_abs": opened.max_abs,
                          "non_finite": opened.non_finite},
            "closed_loop": {**closed.to_dict(), "segments": self.errors.segments,
                            "batches": self.errors.batches},
            "series": closed.series.to_dict(),
            "failures": [dataclasses.asdict(failure) for failure in self.failures],
        }


@dataclass
class Report:
    reference: str
    options: CompareOptions
    comparisons: list[Judged]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def verdict(self) -> str:
        """One line: pass, or the first candidate, gate, output and segment that fail."""
        for comparison in self.comparisons:
            if comparison.failures:
                return comparison.failures[0].describe(comparison.candidate, self.reference)
        return (f"pass: {', '.join(c.candidate for c in self.comparisons)} reproduce"
                f"{'s' if len(self.comparisons) == 1 else ''} {self.reference}")

    def to_dict(self) -> dict[str, Any]:
        options = self.options
        return {"reference": self.reference, "passed": self.passed, "verdict": self.verdict(),
                "tolerances": {"atol": dict(options.atol), "rtol": dict(options.rtol),
                               "closed_loop_atol": options.closed_loop_atol,
                               "min_memory_cosine": options.min_memory_cosine,
                               "min_agreement": options.min_agreement},
                "comparisons": [c.to_dict() for c in self.comparisons]}


def compare_artifacts(reference: str | Path, candidates: Sequence[str | Path],
                      options: CompareOptions | None = None,
                      log: Callable[[str], None] = lambda message: None) -> Report:
    """Open every artifact (all of one model) and compare each candidate with the
    reference on the same documents."""
    options = options or CompareOptions()
    options = dataclasses.replace(options, threads=options.threads or idle_cpus())
    opened = [open_artifact(path, options.authors, options.backend, options.threads)
              for path in (reference, *candidates)]
    base = opened[0]
    for other in opened[1:]:
        check_same_model(base, other)
    config = base.config
    batches = [[ArraySource(doc, config) for doc in docs]
               for docs in validation_batches(config, options.segments, options.seed)]
    comparisons = [judge_candidate(base, other, batches, options) for other in opened[1:]]
    for comparison in comparisons:
        log(f"{comparison.candidate}: {'pass' if comparison.passed else 'drift'}")
    return Report(base.label, options, comparisons)


def judge_candidate(base: Artifact, other: Artifact, batches: Sequence[Sequence[TokenSource]],
                    options: CompareOptions) -> Judged:
    """``other`` against ``base`` on ``batches``, open and closed loop, by the options'
    gates; the failures earliest first (each gate names its first segment)."""
    judge = PolygraphyJudge(options.atol, options.rtol)
    errors = compare(base.engine, other.engine, base.initial_state, batches=batches,
                     candidate_state=other.initial_state, judge=judge, prefill=True)
    failures = (non_finite_failures(errors) + rejected_failures(errors.open_loop, judge.atol_of)
                + closed_loop_failures(errors.closed_loop, options.gates))
    failures.sort(key=lambda f: math.inf if f.segment is None else f.segment)
    return Judged(other.label, errors, failures)


def format_table(report: Report) -> list[str]:
    """The report as text lines: per candidate and output, the largest open- and
    closed-loop errors and 1 - a state output's worst closed-loop slot cosine (an armt's
    per layer), then the worst memory cosine, agreement and the candidate's verdict (the
    report's own verdict is :meth:`Report.verdict`)."""
    lines = [f"reference: {report.reference}"]
    width = max([20, *(len(name) + 1 for comparison in report.comparisons
                       for loop in (comparison.errors.open_loop, comparison.errors.closed_loop)
                       for name in loop.max_abs)])  # the outputs' names, then a space
    header = f"{'':2}{'output':<{width}}{'open loop':>12}{'closed loop':>14}{'1 - cosine':>14}"
    for comparison in report.comparisons:
        opened, closed = comparison.errors.open_loop, comparison.errors.closed_loop
        lines += ["", f"candidate: {comparison.candidate} (open loop: {opened.steps} steps; "
                      f"closed loop: {comparison.errors.segments} segments)", header]
        names = list(dict.fromkeys([*opened.max_abs, *closed.max_abs]))
        for name in names:
            cosine = closed.memory_cosine.get(name)
            lines.append(f"{'':2}{name:<{width}}{_error(opened.max_abs, name):>12}"
                         f"{_error(closed.max_abs, name):>14}"
                         f"{'-' if cosine is None else f'{max(1 - cosine, 0.0):.2e}':>14}")
        lines.append(f"{'':2}{'memory cosine':<{width}}{'':>12}"
                     f"{closed.min_memory_cosine:>14.8f}")
        lines.append(f"{'':2}{'agreement':<{width}}{'':>12}{closed.agreement:>14.2%}")
        lines.append(f"{'':2}{'verdict':<{width}}{'pass' if comparison.passed else 'drift':>12}")
    return lines


def _error(errors: Mapping[str, float], name: str) -> str:
    return f"{errors[name]:.2e}" if name in errors else "-"
