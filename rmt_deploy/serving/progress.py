"""A client's saved progress through one document: enough to resume the sequence on a
restarted (or another) server. Written atomically in the runtime's one saved-state
container (``runtime/state.py``: a JSON header and raw arrays sealed by a sha256), with
every state pair of the contract; checked when read."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rmt_deploy.contract import check_state, state_pairs
from rmt_deploy.errors import InputError
from rmt_deploy.runtime.backends.base import State
from rmt_deploy.runtime.scoring import MeterState
from rmt_deploy.runtime.state import pack, read_state, unpack, write_state
from rmt_deploy.runtime.tokens import TokenSource
from rmt_deploy.segmentation import count_segments
from rmt_deploy.serving.errors import StateFileError
from rmt_deploy.spec import RMTConfig

FORMAT = "rmt-triton-progress"
VERSION = 2  # 2: the runtime's state container, every state pair
STATE_PREFIX = "state/"


@dataclass(frozen=True)
class Progress:
    """Where a document's sequence stands after ``next_segment`` segments."""

    model_id: str  # serving.identity.model_identity of the export
    document_sha256: str  # of the document's cleaned token ids
    tokens: int
    next_segment: int  # the first segment not yet answered
    state: State  # one row's state (every pair) after segment next_segment - 1
    logits: np.ndarray | None  # encoder: last segment's logits (None before the last
    # chunk); decoder: last position's logits
    nll: float = 0.0  # decoder: perplexity so far
    count: int = 0


def document_digest(source: TokenSource, config: RMTConfig) -> str:
    """sha256 of a document's cleaned token ids (int64, little-endian)."""
    digest = hashlib.sha256()
    step = 1 << 16
    for start in range(0, len(source), step):
        digest.update(source.tokens(start, min(start + step, len(source))).astype("<i8").tobytes())
    return digest.hexdigest()


def save_progress(path: str | Path, progress: Progress) -> None:
    """Write ``path`` atomically (a crash leaves the previous version)."""
    header = {"format": FORMAT, "version": VERSION, "model_id": progress.model_id,
              "document_sha256": progress.document_sha256, "tokens": progress.tokens,
              "next_segment": progress.next_segment, "nll": progress.nll,
              "count": progress.count}
    logits = {} if progress.logits is None else {"logits": np.asarray(progress.logits,
                                                                      np.float32)}
    arrays = {**logits, **{STATE_PREFIX + name: array for name, array in progress.state.items()}}
    write_state(path, pack(header, arrays))


def load_progress(path: str | Path, config: RMTConfig) -> Progress:
    """Read a progress file; a damaged or foreign one is a StateFileError."""
    damaged = f"{path}: damaged or truncated progress file; delete it to start the document over"
    try:
        header, arrays = unpack(read_state(path), str(path))
    except InputError:
        if not Path(path).exists():
            raise StateFileError(f"{path}: no such progress file") from None
        raise StateFileError(damaged) from None
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise StateFileError(f"{path}: not an rmt-triton progress file this rmt-deploy reads")
    try:
        state = check_state(config, {pair.name_in: arrays.get(STATE_PREFIX + pair.name_in)
                                     for pair in state_pairs(config)}, None, str(path))
    except InputError as error:
        raise StateFileError(f"{error}: the progress was saved from another model or is "
                             "damaged; delete it to start over") from None
    try:
        progress = Progress(str(header["model_id"]), str(header["document_sha256"]),
                            int(header["tokens"]), int(header["next_segment"]), state,
                            arrays.get("logits"), float(header["nll"]), int(header["count"]))
        if not config.is_encoder:
            MeterState.after(progress.logits, progress.nll, progress.count)  # as resumed
        elif progress.logits is None and progress.next_segment >= count_segments(
                progress.tokens, config):
            raise ValueError("an encoder's finished document keeps its logits")
    except (KeyError, TypeError, ValueError):
        raise StateFileError(damaged) from None
    return progress
