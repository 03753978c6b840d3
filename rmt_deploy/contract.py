"""The step contract, declared once as data: the graph variants an RMT is exported as,
their inputs and outputs (names, dtypes, shapes with named dynamic axes), the recurrent
state they carry as pairs (``name_in <- name_out``) and the range of every dynamic axis.
The exporter's dynamic axes and trace inputs, the manifest's tensor lists and initial
state, the TensorRT profiles and bindings, every backend's state buffers, the stepper's
resident state, saved sessions, the Triton config and the runtime's checks all derive
from it, so a new variant is one entry in :func:`variant`, and a new kind of state one
entry in :data:`STATE`. numpy only."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from rmt_deploy.errors import ConfigError, InputError
from rmt_deploy.spec import ARMT, DECODER, ENCODER, RMTConfig

# Tensor names.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
MEMORY_IN = "memory_in"
MEMORY_OUT = "memory_out"
LOGITS = "logits"
STARTED_IN = "started"  # armt: 0 on a document's first segment, 1 after
STARTED_OUT = "started_out"
WINDOW_IN = "window"  # sliding-window armt: the previous segment's token keys and values
WINDOW_OUT = "window_out"
WINDOW_MASK_IN = "window_mask"  # ... and which of its positions hold a token (1) or not (0)
WINDOW_MASK_OUT = "window_mask_out"

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

# Initial values of a state pair.
ZEROS = "zeros"  # zeros
LEARNED = "learned"  # the reference model's own initial value, saved in the export
FILE = "file"  # an .npy file named by the pair, copied into the export
INITIALS = (ZEROS, LEARNED, FILE)


@dataclass(frozen=True)
class StatePair:
    """One recurrent state: a step reads it as ``name_in`` and returns its next value as
    ``name_out``, which the next step reads. ``shape`` is the input's, batch first, its
    str entries named axes; ``out_shape`` the output's where it differs (a KV cache grows
    by one position a step). ``dtype`` is its own, whatever the layers compute in (an FP32
    state beside FP16 layers). ``sized_by`` names the config field sizing each axis (for
    error messages); ``file`` is the .npy an ``initial=FILE`` pair starts from. A
    ``scaled`` pair is a running sum that grows with the segments read: validation judges
    its errors relative to its largest value (where that exceeds 1), not absolutely. A
    ``binary`` pair (a mark or a mask) holds only 0 and 1."""

    name_in: str
    name_out: str
    dtype: str
    shape: tuple[int | str, ...]
    initial: str = ZEROS
    out_shape: tuple[int | str, ...] | None = None
    sized_by: tuple[str | None, ...] = ()
    file: str | None = None
    scaled: bool = False
    binary: bool = False

    def __post_init__(self) -> None:
        if self.initial not in INITIALS or (self.initial == FILE) != (self.file is not None):
            raise ConfigError(f"state {self.name_in}: initial must be one of "
                              f"{', '.join(INITIALS)}, with a file exactly for {FILE}")
        if not self.shape or self.shape[0] != BATCH:
            raise ConfigError(f"state {self.name_in}: its shape must start with the "
                              f"{BATCH} axis")

    @property
    def input(self) -> Tensor:
        return Tensor(self.name_in, self.dtype, self.shape)

    @property
    def output(self) -> Tensor:
        return Tensor(self.name_out, self.dtype, self.out_shape or self.shape)

    @property
    def row_shape(self) -> tuple[int, ...]:
        """One row's shape (the batch axis dropped); only for a state of fixed size."""
        rest = self.shape[1:]
        if not all(isinstance(d, int) for d in rest):
            raise ConfigError(f"state {self.name_in} grows ({_shape_text(self.shape)}); "
                              "it is not carried between segments")
        return tuple(int(d) for d in rest)

    def zeros(self, rows: int) -> np.ndarray:
        return np.zeros((rows, *self.row_shape), np.dtype(self.dtype))


def rmt_memory(config: RMTConfig) -> tuple[StatePair, ...]:
    """The RMT's state: its memory tokens, read and written by every step."""
    return (StatePair(MEMORY_IN, MEMORY_OUT, "float32",
                      (BATCH, config.num_mem_tokens, config.hidden_size), LEARNED,
                      sized_by=(None, "num_mem_tokens", "hidden_size")),)


def armt_state(config: RMTConfig) -> tuple[StatePair, ...]:
    """The ARMT's state: every layer's associative matrix ``A.{i}`` [d_key, d_model] and
    normaliser ``z.{i}`` [d_key], FP32, then ``started`` [1]: 0 until a document's first
    segment is read, so that segment is marked exactly; then the sliding window's pairs
    (:func:`window_pairs`)."""
    if config.cache_layers is None:
        raise ConfigError("an armt RMT needs its number of layers (cache_layers)")
    pairs = []
    for i in range(config.cache_layers):
        pairs.append(StatePair(f"A.{i}", f"A_out.{i}", "float32",
                               (BATCH, config.d_key, config.hidden_size),
                               sized_by=(None, "d_mem", "hidden_size"), scaled=True))
        pairs.append(StatePair(f"z.{i}", f"z_out.{i}", "float32", (BATCH, config.d_key),
                               sized_by=(None, "d_mem"), scaled=True))
    return (*pairs, StatePair(STARTED_IN, STARTED_OUT, "float32", (BATCH, 1), binary=True),
            *window_pairs(config))


def window_pairs(config: RMTConfig) -> tuple[StatePair, ...]:
    """A sliding-window armt's window (none otherwise): ``window`` [layers, 2, kv_heads,
    segment_size, head_dim] a row, the previous segment's token keys (rotated) and values
    of every layer, zeros past its last token, and ``window_mask`` [segment_size], 1
    where it holds a token; zeros for a new document (a first segment has no past). FP32
    like every pair: keys and values computed in FP16 pass through FP32 exactly, and the
    graphs of every precision keep FP32 inputs and outputs, so one state file serves
    them all; the mask is 0 or 1."""
    if not config.sliding_window:
        return ()
    if None in (config.cache_layers, config.cache_heads, config.head_dim):
        raise ConfigError("a sliding-window armt needs its cache shape (cache_layers, "
                          "cache_heads, head_dim)")
    size = config.segment_size
    return (StatePair(WINDOW_IN, WINDOW_OUT, "float32",
                      (BATCH, config.cache_layers, 2, config.cache_heads, size, config.head_dim),
                      sized_by=(None, "cache_layers", None, "cache_heads", "segment_size",
                                "head_dim")),
            StatePair(WINDOW_MASK_IN, WINDOW_MASK_OUT, "float32", (BATCH, size),
                      sized_by=(None, "segment_size"), binary=True))


#: The state a step carries to the next segment, by model kind (``RMTConfig.variant``).
STATE: dict[str, Callable[[RMTConfig], tuple[StatePair, ...]]] = {
    ENCODER: rmt_memory,
    DECODER: rmt_memory,
    ARMT: armt_state,
}


def state_pairs(config: RMTConfig) -> tuple[StatePair, ...]:
    """The state carried from one segment to the next, as the contract declares it."""
    return STATE[config.variant](config)


def reported(config: RMTConfig) -> StatePair:
    """The state pair that results report as the document's ``memory``: the first one
    declared."""
    return state_pairs(config)[0]


def cache_pairs(config: RMTConfig) -> tuple[StatePair, ...]:
    """A decoder's KV cache, carried from one decode step to the next, layer by layer:
    ``past.{i}.key <- present.{i}.key``, ``past.{i}.value <- present.{i}.value``."""
    shape = (BATCH, config.cache_heads, PAST, config.head_dim)
    grown = (BATCH, config.cache_heads, TOTAL, config.head_dim)
    return tuple(StatePair(f"past.{i}.{kind}", f"present.{i}.{kind}", "float32", shape,
                           out_shape=grown, sized_by=(None, "cache_heads", None, "head_dim"))
                 for i in range(config.cache_layers or 0) for kind in ("key", "value"))


def generation_reads(config: RMTConfig) -> tuple[StatePair, ...]:
    """The carried state a prefill reads: every pair but a sliding-window armt's window,
    since the authors' ``generate`` attends to no window."""
    window = window_pairs(config)
    return tuple(pair for pair in state_pairs(config) if pair not in window)


def decode_reads(config: RMTConfig) -> tuple[StatePair, ...]:
    """The carried state a decode step reads besides its cache: an armt's (A, z) of every
    layer and ``started`` (each generated token reads them; no window), nothing for a
    plain RMT."""
    return generation_reads(config) if config.is_armt else ()


def context_slots(config: RMTConfig) -> int:
    """Memory slots ahead of the generating segment's tokens in a prefill's cache: M for
    a decoder, none for an armt (its last segment runs without memory slots)."""
    return 0 if config.is_armt else config.num_mem_tokens


def past_names(config: RMTConfig) -> list[str]:
    """The cache inputs of a decode step, layer by layer: key, value, key, value, ..."""
    return [pair.name_in for pair in cache_pairs(config)]


def present_names(config: RMTConfig) -> list[str]:
    """The cache outputs of a prefill or decode step, in :func:`past_names` order."""
    return [pair.name_out for pair in cache_pairs(config)]


def concrete(shape: tuple[int | str, ...], sizes: Mapping[str, int]) -> tuple[int, ...]:
    """``shape`` with its named axes sized from ``sizes``."""
    return tuple(sizes[d] if isinstance(d, str) else d for d in shape)


def start_state(config: RMTConfig, learned: Mapping[str, np.ndarray]
                  ) -> dict[str, np.ndarray]:
    """One row's initial state, by input name: zeros, or the ``learned`` (and file)
    values the export holds."""
    return {pair.name_in: (pair.zeros(1)[0] if pair.initial == ZEROS
                           else np.asarray(learned[pair.name_in], dtype=pair.dtype))
            for pair in state_pairs(config)}


def check_state(config: RMTConfig, state: Mapping[str, Any], rows: int | None,
                what: str = "the state") -> dict[str, np.ndarray]:
    """The state of ``rows`` rows (None: one row, without the batch axis), every pair
    present with its declared shape, finite (a binary pair: 0 or 1), in its declared dtype
    (cast within the same kind); anything else is an InputError naming the pair and what
    it should be."""
    checked = {}
    for pair in state_pairs(config):
        array = state.get(pair.name_in) if isinstance(state, Mapping) else None
        expected = pair.row_shape if rows is None else (rows, *pair.row_shape)
        if array is None:
            raise InputError(f"{what}: state {pair.name_in} is missing; this model carries "
                             f"{', '.join(p.name_in for p in state_pairs(config))}")
        array = np.asarray(array)
        if array.shape != expected or not np.can_cast(array.dtype, pair.dtype, "same_kind"):
            raise InputError(f"{what}: state {pair.name_in} is {array.dtype} "
                             f"{tuple(array.shape)}, this model's is {pair.dtype} {expected}; "
                             "it is from another model")
        array = array.astype(pair.dtype, copy=False)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InputError(f"{what}: state {pair.name_in} holds NaN or infinity; it is "
                             "damaged")
        if pair.binary and not np.isin(array, (0, 1)).all():
            raise InputError(f"{what}: state {pair.name_in} holds values other than 0 and 1; "
                             "it is damaged")
        checked[pair.name_in] = array
    return checked


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
    """A graph of the contract. ``reads``: the state pairs whose input it takes;
    ``writes``: those whose output it returns (the state it carries to the next step)."""

    name: str
    file: str  # its ONNX file in an export folder
    plan_file: str  # its TensorRT plan
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    reads: tuple[StatePair, ...] = ()
    writes: tuple[StatePair, ...] = ()

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
    """Batch sizes an engine is built for: 1 = min <= opt <= max (a lone document, and
    the documents left when others end, step in fewer rows)."""

    min: int = 1
    opt: int = 1
    max: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ConfigError(f"batch profile needs 1 <= min <= opt <= max, got "
                              f"{self.min}/{self.opt}/{self.max}; fix --batch")
        if self.min != 1:
            raise ConfigError(f"batch profile {self.min}/{self.opt}/{self.max}: the minimum "
                              "must be 1 (a lone document, and the documents left when "
                              f"others end, step in fewer rows); give --batch "
                              f"1,{self.opt},{self.max}")

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
    """One variant's tensors for this config: the segment's ids and mask and the state it
    reads in, its logits and the state it writes out."""
    if name not in variant_names(config):
        raise ConfigError(f"a {config.variant} RMT has no {name!r} graph; it has "
                          f"{', '.join(variant_names(config))}")
    state = state_pairs(config)
    if name == DECODE:  # an armt's decode step also reads (A, z) of every layer
        cache = cache_pairs(config)
        read = decode_reads(config)
        return Variant(name, f"{name}.onnx", f"{name}.plan",
                       (Tensor(INPUT_IDS, "int64", (BATCH, 1)),
                        Tensor(ATTENTION_MASK, "int64", (BATCH, TOTAL)),
                        *(pair.input for pair in (*read, *cache))),
                       (Tensor(LOGITS, "float32", (BATCH, config.vocab_size)),
                        *(pair.output for pair in cache)), (*read, *cache), cache)
    positions: int | str = config.input_size if config.is_encoder else TOKENS
    segment = (Tensor(INPUT_IDS, "int64", (BATCH, positions)),
               Tensor(ATTENTION_MASK, "int64", (BATCH, positions)))
    inputs = (*segment, *(pair.input for pair in state))
    if name == PREFILL:  # logits [batch, vocab] after each row's last real token, the cache
        read = generation_reads(config)
        cached = (Tensor(p.name_out, p.dtype, tuple(CONTEXT if d == TOTAL else d
                                                     for d in p.output.shape))
                  for p in cache_pairs(config))
        return Variant(name, f"{name}.onnx", f"{name}.plan",
                       (*segment, *(pair.input for pair in read)),
                       (Tensor(LOGITS, "float32", (BATCH, config.vocab_size)), *cached),
                       read)
    if config.is_encoder:
        logits = Tensor(LOGITS, "float32", (BATCH, len(config.labels)))
    else:
        logits = Tensor(LOGITS, "float32", (BATCH, positions, config.vocab_size))
    written = tuple(pair.output for pair in state)
    files = {STEP: ("model.onnx", "model.plan"), WRITE: ("write.onnx", "write.plan")}
    outputs = {STEP: (logits, *written), WRITE: written}[name]
    return Variant(name, *files[name], inputs, outputs, state, state)


def step_graph(graphs: frozenset[str] | Mapping[str, Any], logits: bool) -> str:
    """The variant that runs a segment: the write graph where no logits are read and the
    engine has it, else the step."""
    return WRITE if not logits and WRITE in graphs else STEP


def sizes_of(variant: Variant, feed: Mapping[str, Any]) -> dict[str, int]:
    """The named axes' sizes that the shapes of ``feed``'s arrays (or shapes) give."""
    sizes: dict[str, int] = {}
    for tensor in variant.inputs:
        if tensor.name in feed:
            shape = feed[tensor.name]
            shape = shape if isinstance(shape, tuple) else np.shape(shape)
            sizes.update((d, int(n)) for d, n in zip(tensor.shape, shape, strict=True)
                         if isinstance(d, str))
    if PAST in sizes:
        sizes.setdefault(TOTAL, sizes[PAST] + 1)
    return sizes


def axis_ranges(config: RMTConfig, name: str, batch: BatchProfile | None = None,
                max_new_tokens: int = 0) -> dict[str, tuple[int, int, int]]:
    """``{axis: (min, opt, max)}`` of a variant's dynamic axes. The batch range is the
    engine's profile (unbounded where None). A decoder segment holds 1..segment_size
    tokens; a decode step's cache holds the memory slots (none for an armt), a segment
    and the tokens generated so far: room for ``max_new_tokens`` in an engine's profile,
    as many as the base model's positions allow at runtime."""
    ranges = {BATCH: (batch.min, batch.opt, batch.max) if batch else (1, 1, 2**31 - 1)}
    if config.is_encoder:
        return ranges
    m, size = context_slots(config), config.segment_size
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
