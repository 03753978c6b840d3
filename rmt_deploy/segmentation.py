"""Segmentation and segment layout, written once for the reference model, the runtime,
stream sessions and the Triton client: stripping special tokens, where segments start and
end (of a whole document, or of a stream whose length is not known yet), the per-row
schedule of a batch, and the step tensors (``input_ids``, ``attention_mask``) of each
variant. numpy only."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from rmt_deploy.spec import RMTConfig


def strip_special(ids: Sequence[int] | np.ndarray, config: RMTConfig) -> np.ndarray:
    """Drop the special tokens, as the authors do before segmenting (token-wise, so it
    can run on any piece of a stream)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if config.strip_token_ids:
        ids = ids[~np.isin(ids, np.asarray(config.strip_token_ids, dtype=np.int64))]
    return ids


def usable_tokens(n_tokens: int, config: RMTConfig) -> int:
    """How many of ``n_tokens`` stripped tokens are read: the head of ``max_n_segments``."""
    if config.max_n_segments is None:
        return n_tokens
    return min(n_tokens, config.segment_size * config.max_n_segments)


def clean_ids(ids: Sequence[int] | np.ndarray, config: RMTConfig) -> np.ndarray:
    """Strip special tokens and keep the head of ``max_n_segments`` segments."""
    ids = strip_special(ids, config)
    return ids[: usable_tokens(len(ids), config)]


def content_id_range(config: RMTConfig) -> tuple[int, int]:
    """``[low, high)`` of ordinary token ids (above the special ids, below the memory
    placeholders): what synthetic test documents are drawn from."""
    low = max(config.strip_token_ids, default=-1) + 1
    high = config.vocab_size - (config.num_mem_tokens if config.is_encoder else 0)
    return low, high


def count_segments(n_tokens: int, config: RMTConfig) -> int:
    """Number of segments ``n_tokens`` content tokens split into."""
    return -(-n_tokens // config.segment_size)


def first_size(n_tokens: int, config: RMTConfig) -> int:
    """Tokens the first segment of a document of ``n_tokens`` tokens takes.

    Right alignment puts the remainder in the first segment (every later one is full);
    left alignment gives it a full segment (the document may end sooner).
    """
    size = config.segment_size
    if config.alignment == "left":
        return size
    return (n_tokens - 1) % size + 1


def stream_first_sizes(total_tokens: int | None, config: RMTConfig) -> list[int]:
    """The first-segment sizes a stream of ``total_tokens`` tokens (None: not known
    beforehand) must follow: one, unless the model is right-aligned and the length
    unknown, where the final length picks one of ``1..segment_size``."""
    if total_tokens is not None:
        return [first_size(usable_tokens(total_tokens, config), config)]
    if config.alignment == "left":
        return [config.segment_size]
    return list(range(1, config.segment_size + 1))


def segment_end(start: int, first: int, config: RMTConfig) -> int:
    """Where the segment starting at token ``start`` ends, in the segmentation whose first
    segment takes ``first`` tokens (unless the document ends sooner)."""
    return start + (first if start == 0 else config.segment_size)


def segment_range(n_tokens: int, index: int, config: RMTConfig) -> tuple[int, int]:
    """``(start, end)`` of segment ``index`` of ``n_tokens`` tokens."""
    first = first_size(n_tokens, config)
    start = 0 if index == 0 else first + (index - 1) * config.segment_size
    return start, min(segment_end(start, first, config), n_tokens)


def segment_bounds(n_tokens: int, config: RMTConfig) -> list[tuple[int, int]]:
    """``(start, end)`` of every segment, in order."""
    return [segment_range(n_tokens, i, config) for i in range(count_segments(n_tokens, config))]


def batch_schedule(counts: Sequence[int], config: RMTConfig) -> Iterator[list[tuple[int, int]]]:
    """For each step of a batch, the active ``(row, segment index)`` pairs.

    Rows with fewer segments skip steps: the early ones under right alignment (every
    row's last segment runs at the last step), the late ones under left alignment.
    """
    n_steps = max(counts, default=0)
    for step in range(n_steps):
        active = []
        for row, count in enumerate(counts):
            index = step - (n_steps - count) if config.alignment == "right" else step
            if 0 <= index < count:
                active.append((row, index))
        yield active


def step_inputs(segments: Sequence[np.ndarray], config: RMTConfig) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` and ``attention_mask`` (int64, [batch, positions]) of one step.

    Encoder: ``[CLS] mem_1..mem_M [SEP] tokens [SEP] [PAD]...`` over ``input_size``
    positions, mask = ids != pad. Decoder: the tokens right-padded to the longest segment
    of the batch, mask 1 on real tokens; the memory slots are added by the step itself.
    """
    if config.is_encoder:
        return _encoder_inputs(segments, config)
    return _decoder_inputs(segments, config)


def _encoder_inputs(
    segments: Sequence[np.ndarray], config: RMTConfig
) -> tuple[np.ndarray, np.ndarray]:
    head = [config.cls_token_id, *config.mem_token_ids, config.sep_token_id]
    ids = np.full((len(segments), config.input_size), config.pad_token_id, dtype=np.int64)
    for row, tokens in enumerate(segments):
        n = len(tokens)
        if n > config.segment_size:
            raise ValueError(f"segment of {n} tokens exceeds segment_size {config.segment_size}")
        ids[row, : len(head)] = head
        ids[row, len(head) : len(head) + n] = tokens
        ids[row, len(head) + n] = config.sep_token_id
    return ids, (ids != config.pad_token_id).astype(np.int64)


def _decoder_inputs(
    segments: Sequence[np.ndarray], config: RMTConfig
) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(tokens) for tokens in segments)
    if width > config.segment_size:
        raise ValueError(f"segment of {width} tokens exceeds segment_size {config.segment_size}")
    ids = np.full((len(segments), width), config.pad_token_id, dtype=np.int64)
    mask = np.zeros((len(segments), width), dtype=np.int64)
    for row, tokens in enumerate(segments):
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return ids, mask


def segments_in(tokens: int, config: RMTConfig) -> int:
    """Whole segments in a budget of ``tokens`` (at least one): a served chunk's size."""
    return max(1, tokens // config.segment_size)
