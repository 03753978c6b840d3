"""Proof that an exported graph reproduces the PyTorch reference: ONNX checks, then the
graph and the reference run side by side over several batches, open loop (each step
given the reference memory) and closed loop (each side feeding back its own memory)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rmt_deploy.errors import ValidationError
from rmt_deploy.runtime.backends.base import StepEngine
from rmt_deploy.runtime.loop import run_segments
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
    """Largest absolute error per output, and the worst cosine of memory slots."""

    max_abs: dict[str, float] = field(default_factory=dict)
    min_memory_cosine: float = 1.0
    agreeing: int = 0  # predictions (argmax of the logits) equal on both sides
    predictions: int = 0

    def update(self, name: str, expected: np.ndarray, actual: np.ndarray) -> None:
        error = float(np.max(np.abs(expected.astype(np.float64) - actual)))
        self.max_abs[name] = max(self.max_abs.get(name, 0.0), error)

    def update_memory(self, expected: np.ndarray, actual: np.ndarray) -> None:
        self.update("memory_out", expected, actual)
        a, b = expected.astype(np.float64), actual.astype(np.float64)
        cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
                                    + 1e-30)
        self.min_memory_cosine = min(self.min_memory_cosine, float(cosine.min()))

    def update_agreement(self, expected: np.ndarray, actual: np.ndarray) -> None:
        same = expected.argmax(-1) == actual.argmax(-1)
        self.agreeing += int(same.sum())
        self.predictions += int(same.size)

    @property
    def agreement(self) -> float:
        return self.agreeing / self.predictions if self.predictions else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs": self.max_abs, "min_memory_cosine": self.min_memory_cosine,
                "agreement": self.agreement}


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

    Its memory is both sides' memory side by side on the last axis, so the shared loop's
    per-row bookkeeping carries each side's own memory.
    """

    name = "paired"

    def __init__(self, reference: StepEngine, candidate: StepEngine, closed_loop: bool):
        self.config = reference.config
        self.reference, self.candidate = reference, candidate
        self.closed_loop = closed_loop
        self.stats = ErrorStats()
        self._h = self.config.hidden_size

    def new_state(self, memory: np.ndarray) -> list[Any]:
        h = self._h
        return [self.reference.new_state(memory[..., :h]),
                self.candidate.new_state(memory[..., h:])]

    def memory(self, state: list[Any]) -> np.ndarray:
        return np.concatenate([self.reference.memory(state[0]),
                               self.candidate.memory(state[1])], axis=-1)

    def step(self, state: list[Any], input_ids: np.ndarray, attention_mask: np.ndarray):
        if not self.closed_loop:
            state[1] = self.candidate.new_state(self.reference.memory(state[0]))
        if not self.config.is_encoder:
            self.stats.update("read_logits",
                              self.reference.read(state[0], input_ids, attention_mask),
                              self.candidate.read(state[1], input_ids, attention_mask))
        expected = self.reference.step(state[0], input_ids, attention_mask)
        actual = self.candidate.step(state[1], input_ids, attention_mask)
        keep = attention_mask.astype(bool)
        if not self.config.is_encoder:  # padded positions' logits are not used
            expected, actual = expected[keep], actual[keep]
        self.stats.update("logits", expected, actual)
        self.stats.update_agreement(expected, actual)
        self.stats.update_memory(self.reference.memory(state[0]),
                                 self.candidate.memory(state[1]))
        return expected


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
    ``segments`` in the result is the longest run's."""
    config = reference.config
    if batches is None:
        batches = [[ArraySource(d, config) for d in docs]
                   for docs in validation_batches(config, segments)]
    else:
        segments = max(count_segments(len(source), config)
                       for sources in batches for source in sources)
    results = {}
    for mode in modes:
        paired = _Paired(reference, candidate, closed_loop=mode == "closed_loop")
        for sources in batches:
            run_segments(paired, sources, np.concatenate([initial_memory] * 2, axis=-1),
                         lambda *args: None)
        results[mode] = paired.stats.to_dict()
    results["segments"] = segments
    results["batches"] = [len(sources) for sources in batches]
    return results


def enforce_agreement(results: dict[str, Any], minimum: float, what: str) -> None:
    """Raise ValidationError when a reduced-precision graph's closed-loop predictions
    agree with FP32 less often than ``minimum``."""
    agreement = results["closed_loop"]["agreement"]
    if agreement < minimum:
        raise ValidationError(
            f"{what} agrees with FP32 on {agreement:.2%} of closed-loop predictions over "
            f"{results['segments']} segments, below {minimum:.0%}: it would lose accuracy; "
            "export FP32 only")


def enforce(results: dict[str, Any], tolerance: Tolerance) -> None:
    """Raise ValidationError when any error exceeds its tolerance."""
    for mode, limit in (("open_loop", tolerance.open_loop), ("closed_loop",
                                                             tolerance.closed_loop)):
        for name, error in results[mode]["max_abs"].items():
            if not error <= limit:
                raise ValidationError(
                    f"{mode.replace('_', ' ')} error on {name} is {error:.3g}, above the "
                    f"tolerance {limit:g}; the exported graph does not reproduce the "
                    "reference (loosen explicitly with --atol / --closed-loop-atol)"
                )
