"""A client's saved progress through one document: enough to resume the sequence on a
restarted (or another) server. Written atomically as .npz; checked when read."""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rmt_deploy.files import atomic_path
from rmt_deploy.runtime.tokens import TokenSource
from rmt_deploy.serving.errors import StateFileError
from rmt_deploy.spec import RMTConfig

FORMAT = "rmt-triton-progress-1"


@dataclass(frozen=True)
class Progress:
    """Where a document's sequence stands after ``next_segment`` segments."""

    model_id: str  # serving.identity.model_identity of the export
    document_sha256: str  # of the document's cleaned token ids
    tokens: int
    next_segment: int  # the first segment not yet answered
    memory: np.ndarray  # [M, H] the memory after segment next_segment - 1
    logits: np.ndarray  # encoder: last segment's logits; decoder: last position's logits
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
    with atomic_path(path) as temp, open(temp, "wb") as handle:
        np.savez(handle, format=np.array(FORMAT), model_id=np.array(progress.model_id),
                 document_sha256=np.array(progress.document_sha256),
                 counters=np.array([progress.tokens, progress.next_segment, progress.count]),
                 nll=np.array(progress.nll), memory=progress.memory.astype(np.float32),
                 logits=progress.logits.astype(np.float32))


def load_progress(path: str | Path, config: RMTConfig) -> Progress:
    """Read a progress file; a damaged or foreign one is a StateFileError."""
    damaged = f"{path}: damaged or truncated progress file; delete it to start the document over"
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["format"]) != FORMAT:
                raise StateFileError(f"{path}: not an rmt-triton progress file")
            tokens, next_segment, count = (int(x) for x in data["counters"])
            progress = Progress(str(data["model_id"]), str(data["document_sha256"]), tokens,
                                next_segment, data["memory"], data["logits"],
                                float(data["nll"]), count)
    except (zipfile.BadZipFile, EOFError, KeyError, ValueError, OSError) as error:
        if isinstance(error, FileNotFoundError):
            raise StateFileError(f"{path}: no such progress file") from None
        raise StateFileError(damaged) from None
    expected = (config.num_mem_tokens, config.hidden_size)
    if progress.memory.shape != expected:
        raise StateFileError(f"{path}: memory of shape {progress.memory.shape}, this model's "
                             f"is {expected}: the progress was saved from another model")
    if not np.isfinite(progress.memory).all():
        raise StateFileError(damaged)
    return progress
