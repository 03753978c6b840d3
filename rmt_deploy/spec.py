"""The RMT configuration: the contract that the reference model, the exporter and the
runtime all read. Plain data, no torch."""

from __future__ import annotations

import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from rmt_deploy.errors import ConfigError

#: Modules under an attribute whose name starts with this (torch.onnx scopes their nodes
#: ``/fp32_state.../``) are computed in FP32 in every reduced-precision graph: the
#: recurrent state's arithmetic (ARMT's reads, outer products and running sums).
FP32_SCOPE = "fp32_state"

ENCODER = "encoder"
DECODER = "decoder"
ARMT = "armt"  # associative RMT: a causal LM whose state is (A, z) per layer
VARIANTS = (ENCODER, DECODER, ARMT)
ALIGNMENTS = ("right", "left")

#: Label order of the paper's memorize / detect-and-memorize tasks.
PAPER_LABELS = ("bathroom", "hallway", "garden", "office", "bedroom", "kitchen")

#: Positions an encoder segment spends on special tokens: [CLS] ... [SEP] ... [SEP].
ENCODER_SPECIAL_POSITIONS = 3


@dataclass(frozen=True)
class RMTConfig:
    """Everything needed to segment an input and run the recurrence.

    Encoder (BERT family, the 1M-token paper): a step sees ``input_size`` positions laid
    out as ``[CLS] memory [SEP] tokens [SEP] [PAD]...``; segmentation is right-aligned.
    Decoder (GPT-2, BABILong): a step sees ``[memory ; tokens ; memory]``; segmentation
    is left-aligned.
    ARMT (associative RMT, Llama-style): a step sees ``[tokens ; memory]``; what carries is
    every layer's associative state (A, z), ``d_key = 6 * d_mem`` wide; left-aligned. With
    ``sliding_window`` a segment also attends to the previous segment's token keys and
    values, which carry as well.
    """

    variant: str  # "encoder" or "decoder"
    num_mem_tokens: int  # M, memory slots carried between segments
    hidden_size: int  # H, width of a memory slot
    vocab_size: int  # rows of the (extended) word-embedding table
    segment_size: int  # content tokens per segment
    input_size: int  # positions per step (encoder: the layout; decoder: 2M + segment_size)
    alignment: str  # "right": first segment is the short one; "left": last is
    pad_token_id: int
    strip_token_ids: tuple[int, ...]  # special tokens removed from an input before splitting
    cls_token_id: int | None = None  # encoder layout
    sep_token_id: int | None = None  # encoder layout
    mem_token_ids: tuple[int, ...] = ()  # encoder: placeholder ids of positions 1..M
    max_n_segments: int | None = None  # keep only the head of this many segments (None: all)
    labels: tuple[str, ...] = ()  # encoder: class names, in logit order
    eos_token_id: int | None = None  # decoder: stops greedy generation
    max_positions: int | None = None  # the base model's position table (None: unknown)
    cache_layers: int | None = None  # decoder: layers holding keys and values (KV cache)
    cache_heads: int | None = None  # decoder: key/value heads a layer caches
    head_dim: int | None = None  # decoder: width of a cached key or value
    d_mem: int | None = None  # armt: width of the W_mq / W_mk maps (d_key = 6 * d_mem)
    correction: bool = False  # armt: the write's correction term on z (the authors' default)
    sliding_window: bool = False  # armt: a segment also attends to the previous one's tokens
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (task, training)

    def __post_init__(self) -> None:
        self._check_types()
        self._check()

    @classmethod
    def encoder(
        cls,
        *,
        num_mem_tokens: int,
        hidden_size: int,
        vocab_size: int,
        input_size: int,
        pad_token_id: int,
        cls_token_id: int,
        sep_token_id: int,
        strip_token_ids: tuple[int, ...],
        labels: tuple[str, ...],
        max_n_segments: int | None = None,
        max_positions: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> RMTConfig:
        """An encoder config whose memory placeholders are the last M vocabulary ids."""
        return cls(
            variant=ENCODER,
            num_mem_tokens=num_mem_tokens,
            hidden_size=hidden_size,
            vocab_size=vocab_size,
            segment_size=input_size - num_mem_tokens - ENCODER_SPECIAL_POSITIONS,
            input_size=input_size,
            alignment="right",
            pad_token_id=pad_token_id,
            strip_token_ids=tuple(strip_token_ids),
            cls_token_id=cls_token_id,
            sep_token_id=sep_token_id,
            mem_token_ids=tuple(range(vocab_size - num_mem_tokens, vocab_size)),
            max_n_segments=max_n_segments,
            labels=tuple(labels),
            max_positions=max_positions,
            extra=dict(extra or {}),
        )

    @classmethod
    def decoder(
        cls,
        *,
        num_mem_tokens: int,
        hidden_size: int,
        vocab_size: int,
        segment_size: int,
        pad_token_id: int,
        strip_token_ids: tuple[int, ...] = (),
        eos_token_id: int | None = None,
        max_positions: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> RMTConfig:
        """A decoder config (left-aligned, no cap on the number of segments)."""
        return cls(
            variant=DECODER,
            num_mem_tokens=num_mem_tokens,
            hidden_size=hidden_size,
            vocab_size=vocab_size,
            segment_size=segment_size,
            input_size=2 * num_mem_tokens + segment_size,
            alignment="left",
            pad_token_id=pad_token_id,
            strip_token_ids=tuple(strip_token_ids),
            eos_token_id=eos_token_id,
            max_positions=max_positions,
            extra=dict(extra or {}),
        )

    @classmethod
    def armt(
        cls,
        *,
        num_mem_tokens: int,
        hidden_size: int,
        vocab_size: int,
        segment_size: int,
        d_mem: int,
        correction: bool,
        pad_token_id: int,
        sliding_window: bool = False,
        eos_token_id: int | None = None,
        max_positions: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> RMTConfig:
        """An ARMT config: ``[tokens ; memory]`` a step, left-aligned."""
        return cls(
            variant=ARMT,
            num_mem_tokens=num_mem_tokens,
            hidden_size=hidden_size,
            vocab_size=vocab_size,
            segment_size=segment_size,
            input_size=num_mem_tokens + segment_size,
            alignment="left",
            pad_token_id=pad_token_id,
            strip_token_ids=(),
            eos_token_id=eos_token_id,
            max_positions=max_positions,
            d_mem=d_mem,
            correction=correction,
            sliding_window=sliding_window,
            extra=dict(extra or {}),
        )

    @property
    def is_armt(self) -> bool:
        return self.variant == ARMT

    @property
    def d_key(self) -> int:
        """Width of an ARMT key after the DPFP feature map (nu = 3): 6 * d_mem."""
        if self.d_mem is None:
            raise ConfigError(f"a {self.variant} RMT has no associative memory (d_mem)")
        return 6 * self.d_mem

    @property
    def is_encoder(self) -> bool:
        return self.variant == ENCODER

    def _check_types(self) -> None:
        """Every field holds the type it is declared with (a manifest is untrusted data)."""
        for name, hint in typing.get_type_hints(RMTConfig).items():
            if not _is_instance(getattr(self, name), hint):
                raise ConfigError(f"invalid RMT config: {name} is "
                                  f"{getattr(self, name)!r}, expected {_type_text(hint)}")

    def _check(self) -> None:
        def bad(message: str) -> ConfigError:
            return ConfigError(f"invalid RMT config: {message}")

        if self.variant not in VARIANTS:
            raise bad(f"variant {self.variant!r} is not one of {', '.join(VARIANTS)}")
        if self.alignment not in ALIGNMENTS:
            raise bad(f"alignment {self.alignment!r} is not one of {', '.join(ALIGNMENTS)}")
        if self.num_mem_tokens < 1:
            raise bad(f"num_mem_tokens must be >= 1, got {self.num_mem_tokens}")
        if self.hidden_size < 1 or self.vocab_size < 1:
            raise bad("hidden_size and vocab_size must be positive")
        if self.segment_size < 1:
            raise bad(
                f"no room for content: input size {self.input_size} with "
                f"{self.num_mem_tokens} memory tokens leaves {self.segment_size} tokens a "
                "segment; raise --input-size"
            )
        reach = self.input_size + (self.segment_size if self.sliding_window else 0)
        if self.max_positions is not None and reach > self.max_positions:
            raise bad(
                f"a step needs {reach} positions but the base model has "
                f"{self.max_positions}; lower --input-size / --segment-size"
            )
        if any(v is not None and v < 1 for v in (self.cache_layers, self.cache_heads,
                                                  self.head_dim)):
            raise bad("cache_layers, cache_heads and head_dim must be positive or None")
        if self.max_n_segments is not None and self.max_n_segments < 1:
            raise bad(f"max_n_segments must be >= 1 or None, got {self.max_n_segments}")
        self._check_derived(bad)
        if self.variant == ENCODER:
            if self.cls_token_id is None or self.sep_token_id is None:
                raise bad("an encoder needs cls_token_id and sep_token_id")
            if len(self.mem_token_ids) != self.num_mem_tokens:
                raise bad("mem_token_ids must have num_mem_tokens entries")
            if not self.labels:
                raise bad("an encoder needs its class labels")
            if len(set(self.labels)) != len(self.labels):
                raise bad(f"labels must be distinct, got {','.join(self.labels)}")
        special = {"pad_token_id": [self.pad_token_id], "cls_token_id": [self.cls_token_id],
                   "sep_token_id": [self.sep_token_id], "eos_token_id": [self.eos_token_id],
                   "strip_token_ids": self.strip_token_ids, "mem_token_ids": self.mem_token_ids}
        for name, ids in special.items():
            outside = [i for i in ids if i is not None and not 0 <= i < self.vocab_size]
            if outside:
                raise bad(f"{name} {outside[0]} lies outside the vocabulary "
                          f"[0, {self.vocab_size})")

    def _check_derived(self, bad) -> None:
        """Each derived field agrees with the fields it derives from (a manifest whose
        config contradicts itself would run a layout the model was never trained on)."""
        m, encoder = self.num_mem_tokens, self.variant == ENCODER
        if encoder and self.segment_size != self.input_size - m - ENCODER_SPECIAL_POSITIONS:
            raise bad(f"segment_size {self.segment_size} contradicts input_size "
                      f"{self.input_size} and num_mem_tokens {m}, which give "
                      f"{self.input_size - m - ENCODER_SPECIAL_POSITIONS} (input_size - "
                      f"num_mem_tokens - {ENCODER_SPECIAL_POSITIONS})")
        slots = 1 if self.variant == ARMT else 2
        if not encoder and self.input_size != slots * m + self.segment_size:
            raise bad(f"input_size {self.input_size} contradicts segment_size "
                      f"{self.segment_size} and num_mem_tokens {m}, which give "
                      f"{slots * m + self.segment_size} ({slots} * num_mem_tokens + "
                      "segment_size)")
        if (self.variant == ARMT) != (self.d_mem is not None):
            raise bad("d_mem is set exactly for an armt RMT")
        if self.sliding_window and self.variant != ARMT:
            raise bad("sliding_window is set only for an armt RMT")
        if self.d_mem is not None and self.d_mem < 1:
            raise bad(f"d_mem must be >= 1, got {self.d_mem}")
        expected = ALIGNMENTS[0] if encoder else ALIGNMENTS[1]
        if self.alignment != expected:
            raise bad(f"alignment {self.alignment!r} contradicts variant {self.variant!r}, "
                      f"whose segments are {expected}-aligned")
        if encoder and self.mem_token_ids != tuple(range(self.vocab_size - m, self.vocab_size)):
            raise bad(f"mem_token_ids {list(self.mem_token_ids)} contradict vocab_size "
                      f"{self.vocab_size} and num_mem_tokens {m}: they are the last "
                      f"{m} ids of the vocabulary")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        data = asdict(self)
        for key in ("strip_token_ids", "mem_token_ids", "labels"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RMTConfig:
        """Inverse of :meth:`to_dict`; unknown or missing keys are a ConfigError."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"invalid RMT config: unknown keys {', '.join(unknown)}")
        try:
            values = dict(data)
            for key in ("strip_token_ids", "mem_token_ids", "labels"):
                if key in values:
                    values[key] = tuple(values[key])
            return cls(**values)
        except TypeError as error:
            raise ConfigError(f"invalid RMT config: {error}") from None


def _is_instance(value: Any, hint: Any) -> bool:
    """``isinstance`` for the field types of RMTConfig (bool is not an int here)."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_is_instance(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, tuple) and all(_is_instance(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_text(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
