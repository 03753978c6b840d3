"""A resumable run over a long input (``rmt-run --state-file/--resume``): the input is
tokenized, then fed to a session of known length; its state is saved every N segments
with a record of the input read so far, so a run killed part-way resumes where the last
state left it and gives the answer an uninterrupted run gives."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import BinaryIO

from rmt_deploy.errors import InputError
from rmt_deploy.files import same_file
from rmt_deploy.outputs import check_output_file
from rmt_deploy.runtime.model import Progress, RMTModel
from rmt_deploy.runtime.results import Run
from rmt_deploy.runtime.session import StreamSession
from rmt_deploy.runtime.state import MAGIC, read_state, write_state
from rmt_deploy.runtime.tokens import TokenSource, spool_file
from rmt_deploy.segmentation import count_segments

BLOCK_TOKENS = 1 << 16  # ids hashed or fed at a time


def run_resumable(model: RMTModel, document: Path | BinaryIO, *, state_file: Path | None,
                  every: int, resume: Path | None = None,
                  progress: Progress | None = None) -> Run:
    """Run one document, saving the state to ``state_file`` every ``every`` segments
    (removed once the run completes); ``resume`` continues from a saved state, and without
    ``state_file`` the run goes on saving to ``resume`` (so it removes it too). The run's
    ``tokens_per_second`` counts only the tokens run after the saved state."""
    if every < 1:
        raise InputError(f"state every N segments needs N >= 1, got {every}")
    if model.tokenizer is None:
        raise InputError("this model has no tokenizer; rmt-run reads text")
    if state_file is not None:
        check_state_file(state_file, document if isinstance(document, Path) else None)
    if state_file is None:
        state_file = resume  # a state rmt-run wrote: read and sealed before any save/remove
    state = _OwnState(state_file, resume)
    started = time.perf_counter()
    with spool_file(document, model.tokenizer, model.config) as source:
        total = len(source)
        if total == 0:
            raise InputError("the input has no tokens after removing special tokens")
        digest = hashlib.sha256()
        if resume is None:
            session = StreamSession(model, total_tokens=total)
        else:
            session = _resumed(model, resume, source, digest)
        size = model.config.segment_size
        segments = count_segments(total, model.config)
        position = resumed = session.tokens
        while position < total:
            end = min(total, position + every * size)
            for start in range(position, end, BLOCK_TOKENS):
                ids = source.tokens(start, min(end, start + BLOCK_TOKENS))
                digest.update(ids.astype("<i8").tobytes())
                session.feed(ids)
            position = end
            if state_file is not None and position < total:
                state.save(session.save({"input": {
                    "tokens": total, "read": position, "sha256": digest.hexdigest()}}))
            if progress is not None:
                progress(count_segments(position, model.config) if position < total
                         else segments, segments)
        output = session.close()
    state.remove()
    return Run([output], model.backend, getattr(model.engine, "precision", "fp32"),
               time.perf_counter() - started, resumed_tokens=resumed)


def check_state_file(path: Path, document: Path | None = None,
                     model: Path | None = None) -> None:
    """Refuse a state file that would replace, then delete, what rmt-run did not write: a
    folder, an existing file that is not a state saved by rmt-run, the run's input
    ``document``, its ``model``, a path inside an export folder, or one whose folder
    does not exist."""
    check_output_file(path, "--state-file", example="run.state",
                      inputs={"the input of this run": document, "the model of this run": model},
                      ours=_is_state, mine="a state saved by rmt-run")


class _OwnState:
    """A run's state file: saved only over what was there when the run started or the
    run's own last save, and deleted at the end only if it is still the file this run
    saved (or resumed from), never a file put there since."""

    def __init__(self, path: Path | None, resume: Path | None) -> None:
        self.path = path
        self._last = _identity(path) if path is not None else None
        self._mine = path is not None and resume is not None and same_file(path, resume)

    def save(self, data: bytes) -> None:
        if _identity(self.path) not in (None, self._last):
            raise InputError(f"{self.path}: replaced by another file during the run, which is "
                             "left as it is; run again with another --state-file")
        write_state(self.path, data)
        self._last, self._mine = _identity(self.path), True

    def remove(self) -> None:
        if self._mine and _identity(self.path) == self._last:
            self.path.unlink()


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _is_state(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC


def _resumed(model: RMTModel, path: Path, source: TokenSource, digest) -> StreamSession:
    session = StreamSession.restore(model, read_state(path), name=str(path))
    record = session.metadata.get("input")
    if not isinstance(record, dict) or session.total_tokens is None:
        raise InputError(f"{path}: not a state written by rmt-run --state-file; resume it "
                         "with the Python API")
    if record.get("tokens") != len(source) or record.get("read") != session.tokens:
        raise InputError(f"{path}: saved from an input of {record.get('tokens')} tokens, this "
                         f"one has {len(source)}; resume with the input the run started on")
    for start in range(0, session.tokens, BLOCK_TOKENS):
        ids = source.tokens(start, min(session.tokens, start + BLOCK_TOKENS))
        digest.update(ids.astype("<i8").tobytes())
    if digest.hexdigest() != record.get("sha256"):
        raise InputError(f"{path}: saved from another input (its first {session.tokens} "
                         "tokens differ); resume with the input the run started on")
    return session
