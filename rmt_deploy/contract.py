"""The step contract, declared once as data: the graph variants an RMT is exported as,
their inputs and outputs (names, dtypes, shapes with named dynamic axes) and the range of
every dynamic axis. The exporter's dynamic axes, the manifest's tensor lists, the
TensorRT profiles, the Triton config dims and the runtime's input checks all derive from
it, so a new variant is one entry here. numpy only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from rmt_deploy.errors import ConfigError, InputError
from rmt_deploy.spec import RMTConfig

# Tensor names.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
MEMORY_IN = "memory_in"
MEMORY_OUT = "memory_out"
LOGITS = "logits"

# Graph variants.
STEP = "step"  # reads a segment, writes the memory, returns the logits
WRITE = "write"  # the step without its head: the memory only (segments nobody reads)
PREFILL = "prefill"  # decoders: [memory ; tokens] without write slots -> next logits, cache
DECODE = "decode"  # decoders: one generated token with the cached keys and values

# Dynamic axes.
BATCH = "batch"
TOKENS = "tokens"  # a decoder segment's tokens
CONTEXT = "context"  # positions a prefill caches: memory slots + tokens
PAST = "past"  # positions cached before a decode step
TOTAL = "total"  # past + 1: the positions a decode step attends to


def past_names(config: RMTConfig) -> list[str]:
    """The cache inputs of a decode step, layer by layer: key, value, key, value, ..."""
    return [f"past.{i}.{kind}" for i in range(config.cache_layers or 0)
            for kind in ("key", "value")]


def present_names(config: RMTConfig) -> list[str]:
    """The cache outputs of a prefill or decode step, in :func:`past_names` order."""
    return [name.replace("past.", "present.", 1) for name in past_names(config)]


@dataclass(frozen=True)
class Tensor:
    """One input or output: a numpy dtype name and a shape whose str entries are named
    dynamic axes."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tensor:
        return cls(data["name"], data["dtype"], tuple(data["shape"]))


@dataclass(frozen=True)
class Variant:
    """A graph of the contract."""

    name: str
    file: str  # its ONNX file in an export folder
    plan_file: str  # its TensorRT plan
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    @property
    def writes_memory(self) -> bool:
        return any(t.name == MEMORY_OUT for t in self.outputs)

    def tensor(self, name: str) -> Tensor:
        for tensor in (*self.inputs, *self.outputs):
            if tensor.name == name:
                return tensor
        raise KeyError(name)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``{tensor: {axis index: axis name}}``, as torch.onnx.export takes them."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in (*self.inputs, *self.outputs)}


@dataclass(frozen=True)
class BatchProfile:
    """Batch sizes an engine is built for: min <= opt <= max."""

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


def variant_names(config: RMTConfig) -> tuple[str, ...]:
    """The variants an RMT of this config is exported as, the step first; decoders whose
    cache shape is known also generate with a KV cache."""
    if config.is_encoder or config.cache_layers is None:
        return (STEP, WRITE)
    return (STEP, WRITE, PREFILL, DECODE)


def variants(config: RMTConfig) -> dict[str, Variant]:
    return {name: variant(config, name) for name in variant_names(config)}


def variant(config: RMTConfig, name: str) -> Variant:
    """One variant's tensors for this config."""
    if name not in variant_names(config):
        raise ConfigError(f"a {config.variant} RMT has no {name!r} graph; it has "
                          f"{', '.join(variant_names(config))}")
    if name in (PREFILL, DECODE):
        return _generation_variant(config, name)
    m, h = config.num_mem_tokens, config.hidden_size
    positions: int | str = config.input_size if config.is_encoder else TOKENS
    inputs = (
        Tensor(INPUT_IDS, "int64", (BATCH, positions)),
        Tensor(ATTENTION_MASK, "int64", (BATCH, positions)),
        Tensor(MEMORY_IN, "float32", (BATCH, m, h)),
    )
    if config.is_encoder:
        logits = Tensor(LOGITS, "float32", (BATCH, len(config.labels)))
    else:
        logits = Tensor(LOGITS, "float32", (BATCH, positions, config.vocab_size))
    memory = Tensor(MEMORY_OUT, "float32", (BATCH, m, h))
    files = {STEP: ("model.onnx", "model.plan"), WRITE: ("write.onnx", "write.plan")}
    outputs = {STEP: (logits, memory), WRITE: (memory,)}[name]
    return Variant(name, *files[name], inputs, outputs)


def _generation_variant(config: RMTConfig, name: str) -> Variant:
    """Prefill: (input_ids, attention_mask, memory_in) -> (logits [batch, vocab] after each
    row's last real token, present.*). Decode: (input_ids [batch, 1], attention_mask
    [batch, total], past.*) -> (logits, present.*)."""
    cache = (config.cache_heads, config.head_dim)
    logits = Tensor(LOGITS, "float32", (BATCH, config.vocab_size))
    if name == PREFILL:
        inputs = (Tensor(INPUT_IDS, "int64", (BATCH, TOKENS)),
                  Tensor(ATTENTION_MASK, "int64", (BATCH, TOKENS)),
                  Tensor(MEMORY_IN, "float32", (BATCH, config.num_mem_tokens,
                                                config.hidden_size)))
        grown = CONTEXT
    else:
        inputs = (Tensor(INPUT_IDS, "int64", (BATCH, 1)),
                  Tensor(ATTENTION_MASK, "int64", (BATCH, TOTAL)),
                  *(Tensor(n, "float32", (BATCH, cache[0], PAST, cache[1]))
                    for n in past_names(config)))
        grown = TOTAL
    outputs = (logits, *(Tensor(n, "float32", (BATCH, cache[0], grown, cache[1]))
                         for n in present_names(config)))
    return Variant(name, f"{name}.onnx", f"{name}.plan", inputs, outputs)


def axis_ranges(config: RMTConfig, name: str, batch: BatchProfile | None = None,
                max_new_tokens: int = 0) -> dict[str, tuple[int, int, int]]:
    """``{axis: (min, opt, max)}`` of a variant's dynamic axes. The batch range is the
    engine's profile (unbounded where None). A decoder segment holds 1..segment_size
    tokens; a decode step's cache holds the memory slots, a segment and the tokens
    generated so far: room for ``max_new_tokens`` in an engine's profile, as many as the
    base model's positions allow at runtime."""
    ranges = {BATCH: (batch.min, batch.opt, batch.max) if batch else (1, 1, 2**31 - 1)}
    if config.is_encoder:
        return ranges
    m, size = config.num_mem_tokens, config.segment_size
    ranges[TOKENS] = (1, size, size)
    ranges[CONTEXT] = (m + 1, m + size, m + size)
    if name == DECODE:
        limit = config.max_positions if config.max_positions is not None else 2**31 - 1
        high = limit - 1 if batch is None else min(limit - 1, m + size + max_new_tokens - 1)
        ranges[PAST] = (m + 1, min(m + size, high), high)
        ranges[TOTAL] = tuple(value + 1 for value in ranges[PAST])
    return ranges


def profile_shapes(config: RMTConfig, name: str, batch: BatchProfile,
                   max_new_tokens: int = 0) -> dict[str, tuple[tuple[int, ...], ...]]:
    """``{input: (min, opt, max)}`` shapes of a variant for a TensorRT profile."""
    ranges = axis_ranges(config, name, batch, max_new_tokens)
    return {t.name: tuple(tuple(ranges[d][k] if isinstance(d, str) else d for d in t.shape)
                          for k in range(3))
            for t in variant(config, name).inputs}


def check_feed(config: RMTConfig, name: str, feed: Mapping[str, np.ndarray],
               what: str = "the step") -> None:
    """Raise InputError naming the first input of ``feed`` that breaks the variant's
    contract: missing, wrong dtype or rank, a static dim or a dynamic axis out of range,
    axes of one name that disagree, token ids outside the vocabulary or a mask other
    than 0/1."""
    ranges = axis_ranges(config, name)
    bound: dict[str, int] = {}
    for tensor in variant(config, name).inputs:
        array = feed.get(tensor.name)
        if array is None:
            raise InputError(f"{what}: input {tensor.name} is missing")
        array = np.asarray(array)
        if array.dtype != np.dtype(tensor.dtype) or array.ndim != len(tensor.shape):
            raise InputError(f"{what}: {tensor.name} is {array.dtype} of rank {array.ndim}, "
                             f"the model takes {tensor.dtype} {_shape_text(tensor.shape)}")
        for size, dim in zip(array.shape, tensor.shape, strict=True):
            if isinstance(dim, int) and size != dim:
                raise InputError(f"{what}: {tensor.name} has shape {array.shape}, the model "
                                 f"takes {_shape_text(tensor.shape)}")
            if isinstance(dim, str):
                low, _, high = ranges[dim]
                if not low <= size <= high or bound.setdefault(dim, size) != size:
                    raise InputError(f"{what}: {tensor.name} has {dim} {size}; the model takes "
                                     f"{low} to {high}, the same for every input")
    if TOTAL in bound and bound[TOTAL] != bound[PAST] + 1:
        raise InputError(f"{what}: attention_mask covers {bound[TOTAL]} positions; it must "
                         f"cover the {bound[PAST]} cached ones and the new token")
    ids, mask = np.asarray(feed[INPUT_IDS]), np.asarray(feed[ATTENTION_MASK])
    if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
        raise InputError(f"{what}: token ids must lie in [0, {config.vocab_size}); wrong "
                         "tokenizer?")
    if not np.isin(mask, (0, 1)).all():
        raise InputError(f"{what}: attention_mask must be 0 or 1")


def _shape_text(shape: tuple[int | str, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
