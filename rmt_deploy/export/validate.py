"""Proof that an exported graph reproduces the PyTorch reference: ONNX checks, then the
graph and the reference run side by side over several batches, open loop (each step
given the reference memory) and closed loop (each side feeding back its own memory)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rmt_deploy.contract import WRITE
from rmt_deploy.errors import ValidationError
from rmt_deploy.runtime.backends.base import EngineState, StepEngine
from rmt_deploy.runtime.loop import every_step, never, run_segments
from rmt_deploy.runtime.stepper import Stepper
from rmt_deploy.runtime.tokens import ArraySource, TokenSource
from rmt_deploy.segmentation import content_id_range, count_segments
from rmt_deploy.spec import RMTConfig


@dataclass(frozen=True)
class Tolerance:
    """Largest absolute error allowed per output."""

    open_loop: float = 1e-4  # one step from the same memory
    closed_loop: float = 1e-3  # after every segment of a closed-loop run


@dataclass
class ErrorStats:
    """Largest absolute error per output, the worst cosine of memory slots, and how many
    values of each output were not finite on either side (those count in no other
    figure, so every figure stays a finite number)."""

    max_abs: dict[str, float] = field(default_factory=dict)
    min_memory_cosine: float = 1.0
    agreeing: int = 0  # predictions (argmax of the logits) equal on both sides
    predictions: int = 0
    non_finite: dict[str, int] = field(default_factory=dict)

    def update(self, name: str, expected: np.ndarray, actual: np.ndarray) -> None:
        expected, actual = expected.astype(np.float64), actual.astype(np.float64)
        finite = np.isfinite(expected) & np.isfinite(actual)
        self.non_finite[name] = self.non_finite.get(name, 0) + int(finite.size - finite.sum())
        error = float(np.max(np.abs(expected - actual)[finite], initial=0.0))
        self.max_abs[name] = max(self.max_abs.get(name, 0.0), error)

    def update_memory(self, expected: np.ndarray, actual: np.ndarray,
                      name: str = "memory_out") -> None:
        self.update(name, expected, actual)
        a, b = expected.astype(np.float64), actual.astype(np.float64)
        finite = (np.isfinite(a) & np.isfinite(b)).all(-1)
        a, b = a[finite], b[finite]
        cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
                                    + 1e-30)
        self.min_memory_cosine = min(self.min_memory_cosine, float(cosine.min(initial=1.0)))

    def update_agreement(self, expected: np.ndarray, actual: np.ndarray) -> None:
        same = expected.argmax(-1) == actual.argmax(-1)
        self.agreeing += int(same.sum())
        self.predictions += int(same.size)

    @property
    def agreement(self) -> float:
        return self.agreeing / self.predictions if self.predictions else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs": self.max_abs, "min_memory_cosine": self.min_memory_cosine,
                "agreement": self.agreement, "non_finite": self.non_finite}


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


class _Paired(StepEngine):
    """Runs the reference and the candidate in lockstep and records their differences.

    Its memory is both sides' memory side by side on the last axis, so the stepper's
    per-row bookkeeping carries each side's own memory. In open loop the candidate is
    given the reference's memory before every step.
    """

    name = "paired"

    def __init__(self, reference: StepEngine, candidate: StepEngine, closed_loop: bool):
        self.config = reference.config
        self.reference, self.candidate = reference, candidate
        self.closed_loop = closed_loop
        self.stats = ErrorStats()

    def new_state(self, memory: np.ndarray) -> _PairedState:
        h = self.config.hidden_size
        return _PairedState(self, self.reference.new_state(memory[..., :h]),
                            self.candidate.new_state(memory[..., h:]))


class _PairedState(EngineState):
    def __init__(self, paired: _Paired, reference: EngineState, candidate: EngineState):
        super().__init__(reference.batch)
        self._paired, self.reference, self.candidate = paired, reference, candidate

    def load(self, memory: np.ndarray) -> None:
        h = self._paired.config.hidden_size
        self.reference.load(memory[..., :h])
        self.candidate.load(memory[..., h:])

    def memory(self) -> np.ndarray:
        return np.concatenate([self.reference.memory(), self.candidate.memory()], axis=-1)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             logits: bool = True) -> np.ndarray | None:
        """The step of both sides; with ``logits=False`` the candidate runs its write
        graph and only the memory is compared (as ``write_memory_out``)."""
        paired, stats = self._paired, self._paired.stats
        if not paired.closed_loop:
            self.candidate.load(self.reference.memory())
        if not logits:
            self.reference.step(input_ids, attention_mask)
            self.candidate.step(input_ids, attention_mask, logits=False)
            stats.update_memory(self.reference.memory(), self.candidate.memory(),
                                "write_memory_out")
            return None
        if not paired.config.is_encoder:
            stats.update("read_logits", self.reference.read(input_ids, attention_mask),
                         self.candidate.read(input_ids, attention_mask))
        expected = self.reference.step(input_ids, attention_mask)
        actual = self.candidate.step(input_ids, attention_mask)
        if not paired.config.is_encoder:  # padded positions' logits are not used
            keep = attention_mask.astype(bool)
            expected, actual = expected[keep], actual[keep]
        stats.update("logits", expected, actual)
        stats.update_agreement(expected, actual)
        stats.update_memory(self.reference.memory(), self.candidate.memory())
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


def compare(reference: StepEngine, candidate: StepEngine, initial_memory: np.ndarray,
            segments: int = 32, modes: tuple[str, ...] = ("open_loop", "closed_loop"),
            batches: Sequence[Sequence[TokenSource]] | None = None) -> dict[str, Any]:
    """Open- and closed-loop errors of ``candidate`` against ``reference``, over
    ``batches`` of documents (default: :func:`validation_batches` of ``segments``);
    ``segments`` in the result is the longest run's. Where the candidate has a write
    graph, each mode runs the documents twice: through its step graph, then through its
    write graph (``write_memory_out``)."""
    config = reference.config
    if batches is None:
        batches = [[ArraySource(d, config) for d in docs]
                   for docs in validation_batches(config, segments)]
    else:
        segments = max(count_segments(len(source), config)
                       for sources in batches for source in sources)
    results = {}
    both = np.concatenate([initial_memory] * 2, axis=-1)
    passes = [every_step] + ([never] if WRITE in candidate.graphs else [])
    for mode in modes:
        paired = _Paired(reference, candidate, closed_loop=mode == "closed_loop")
        for wants_logits, sources in itertools.product(passes, batches):
            with Stepper(paired) as stepper:
                for row in range(len(sources)):
                    stepper.add(row, both)
                run_segments(stepper, sources, lambda *args: None, wants_logits=wants_logits)
        results[mode] = paired.stats.to_dict()
    results["segments"] = segments
    results["batches"] = [len(sources) for sources in batches]
    return results


def enforce_finite(results: dict[str, Any], what: str) -> None:
    """Raise ValidationError when either side produced NaN or infinity anywhere."""
    for mode in ("open_loop", "closed_loop"):
        for name, count in results.get(mode, {}).get("non_finite", {}).items():
            if count:
                raise ValidationError(
                    f"{what}: {count} value(s) of {name} are NaN or infinite in the "
                    f"{mode.replace('_', ' ')} run; the weights or the graph are damaged "
                    "(check the checkpoint for NaN/Inf weights)")


def enforce_agreement(results: dict[str, Any], minimum: float, what: str) -> None:
    """Raise ValidationError when a reduced-precision graph produced non-finite values or
    its closed-loop predictions agree with FP32 less often than ``minimum``."""
    enforce_finite(results, what)
    agreement = results["closed_loop"]["agreement"]
    if agreement < minimum:
        raise ValidationError(
            f"{what} agrees with FP32 on {agreement:.2%} of closed-loop predictions over "
            f"{results['segments']} segments, below {minimum:.0%}: it would lose accuracy; "
            "export FP32 only")


def enforce(results: dict[str, Any], tolerance: Tolerance) -> None:
    """Raise ValidationError when any value is not finite or any error exceeds its
    tolerance."""
    enforce_finite(results, "validation")
    for mode, limit in (("open_loop", tolerance.open_loop), ("closed_loop",
                                                             tolerance.closed_loop)):
        for name, error in results[mode]["max_abs"].items():
            if not error <= limit:
                raise ValidationError(
                    f"{mode.replace('_', ' ')} error on {name} is {error:.3g}, above the "
                    f"tolerance {limit:g}; the exported graph does not reproduce the "
                    "reference (loosen explicitly with --atol / --closed-loop-atol)"
                )
