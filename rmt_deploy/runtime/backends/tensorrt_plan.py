"""What a TensorRT plan is built for and where it may run: optimization profiles from the
step contract, and the compatibility check made before deserializing a plan. Pure
Python, so it is tested without TensorRT."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rmt_deploy.errors import BackendError, ConfigError
from rmt_deploy.manifest import ATTENTION_MASK, INPUT_IDS, MEMORY_IN, READ_GRAPH
from rmt_deploy.spec import RMTConfig

PLAN_FILES = {"step": "model.plan", READ_GRAPH: "generate.plan"}


@dataclass(frozen=True)
class BatchProfile:
    """Batch sizes of the one optimization profile: min <= opt <= max."""

    min: int = 1
    opt: int = 1
    max: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ConfigError(f"batch profile needs 1 <= min <= opt <= max, got "
                              f"{self.min}/{self.opt}/{self.max}; fix --batch")

    @classmethod
    def parse(cls, text: str) -> BatchProfile:
        """``"1,4,8"`` (min,opt,max) or ``"8"`` (1,8,8)."""
        try:
            values = [int(part) for part in text.split(",")]
        except ValueError:
            raise ConfigError(f"--batch {text!r}: give MIN,OPT,MAX or MAX, e.g. 1,4,8") from None
        if len(values) == 1:
            return cls(1, values[0], values[0])
        if len(values) == 3:
            return cls(*values)
        raise ConfigError(f"--batch {text!r}: give MIN,OPT,MAX or MAX, e.g. 1,4,8")


def profile_shapes(config: RMTConfig, graph: str, batch: BatchProfile,
                   max_new_tokens: int = 0) -> dict[str, tuple[tuple[int, ...], ...]]:
    """``{input: (min, opt, max)}`` shapes. The segment length is fixed for encoders; a
    decoder's token axis spans 1..segment_size (the read graph also holds generated
    tokens)."""
    m, h = config.num_mem_tokens, config.hidden_size
    if config.is_encoder:
        low = opt = high = config.input_size
    else:
        low, opt, high = 1, config.segment_size, config.segment_size
        if graph == READ_GRAPH:
            high = config.segment_size + max_new_tokens
            if config.max_positions is not None:
                high = min(high, config.max_positions - m)
    tokens = tuple((b, n) for b, n in ((batch.min, low), (batch.opt, opt), (batch.max, high)))
    memory = tuple((b, m, h) for b in (batch.min, batch.opt, batch.max))
    return {INPUT_IDS: tokens, ATTENTION_MASK: tokens, MEMORY_IN: memory}


def check_compatible(record: dict[str, Any], tensorrt_version: str, gpu_name: str,
                     compute_capability: str) -> None:
    """Refuse a plan built for another TensorRT version or GPU, before deserializing it
    (TensorRT itself fails there with an opaque error)."""
    built = record.get("tensorrt")
    if built != tensorrt_version:
        raise BackendError(
            f"{record.get('file', 'plan')} was built with TensorRT {built}, this host has "
            f"{tensorrt_version}; rebuild it here with rmt-export --engine")
    if record.get("compute_capability") != compute_capability:
        raise BackendError(
            f"{record.get('file', 'plan')} was built for {record.get('gpu')} (compute "
            f"capability {record.get('compute_capability')}), this GPU is {gpu_name} "
            f"({compute_capability}); rebuild it here with rmt-export --engine")
