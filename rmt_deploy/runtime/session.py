"""Stream sessions: a document fed in pieces of any size as it arrives, with a result
that always equals what ``model.run_one`` gives on everything fed so far.

Text is tokenized up to its last word end and the unfinished word waits (``TextStream``);
token ids are taken as they come. A segment runs as soon as it is complete. Where a
segment starts depends on the alignment:

- left (decoders): segments start at 0, s, 2s, ...; one *track* (memory and scorer).
- right (encoders): the first segment is the short one, so segment starts depend on the
  final length, which a stream does not know. The session keeps one track per possible
  length of the first segment (1..s) and advances them together as rows of one batch;
  the result reads the track whose first segment fits the length so far. That is exact
  and fixed in size, and costs s rows a segment instead of one. A known length
  (``total_tokens``) needs one track.

``result()`` never changes the session: the unfinished word is tokenized as if the text
ended there and whatever has not run yet (a left-aligned short last segment, or the
tracks' last full segments) runs on a copy.
"""

from __future__ import annotations

import copy
import threading
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from rmt_deploy.contract import check_state, reported, state_pairs
from rmt_deploy.errors import InputError, NumericError
from rmt_deploy.runtime.batcher import Rows
from rmt_deploy.runtime.results import (
    DecoderOutput,
    EncoderOutput,
    decoder_output,
    encoder_output,
)
from rmt_deploy.runtime.scoring import MeterState, PerplexityMeter
from rmt_deploy.runtime.state import pack, unpack
from rmt_deploy.runtime.stepper import Stepper
from rmt_deploy.runtime.tokens import ArraySource, TextStream, check_tokenizer_ids
from rmt_deploy.segmentation import (
    first_size,
    segment_end,
    stream_first_sizes,
    strip_special,
    usable_tokens,
)
from rmt_deploy.spec import RMTConfig

if TYPE_CHECKING:
    from rmt_deploy.runtime.model import RMTModel

STATE_FORMAT = "rmt-deploy-session"
STATE_VERSION = 2  # 2: every state pair of the contract, as STATE_PREFIX + its input name
STATE_PREFIX = "state/"
#: What a session is fed: text (str or UTF-8 bytes) or token ids.
Piece = str | bytes | bytearray | Sequence[int] | np.ndarray
Output = EncoderOutput | DecoderOutput


@dataclass
class _Track:
    """The recurrence over one segmentation: its first segment has ``first`` tokens,
    the others ``segment_size``. Its state is row ``key`` of the session's rows."""

    first: int
    key: tuple[str, int]
    done: int = 0  # tokens its segments have read
    logits: np.ndarray | None = None  # encoder: of its last segment
    meter: PerplexityMeter | None = None  # decoder

    def copy(self) -> _Track:
        return replace(self, meter=copy.copy(self.meter))


class StreamSession:
    """One document fed in pieces; safe to use from several threads (calls serialize)."""

    def __init__(self, model: RMTModel, *, total_tokens: int | None = None,
                 rows: Rows | None = None) -> None:
        """``total_tokens``: the document's length in tokens, where known beforehand
        (a right-aligned model then runs one track); ``rows``: where the tracks' state
        lives and steps (default: a stepper of its own, stepping in the calling thread;
        a ``StepBatcher`` batches sessions)."""
        self.model = model
        self.config: RMTConfig = model.config
        if total_tokens is not None and (isinstance(total_tokens, bool) or not isinstance(
                total_tokens, int) or total_tokens < 1):
            raise InputError(f"total_tokens must be a positive int or None, got {total_tokens!r}")
        self.total_tokens = total_tokens
        self.metadata: dict[str, Any] = {}  # kept with the saved state
        self._rows: Rows = rows if rows is not None else Stepper(model.engine)
        self._shared_rows = rows  # None: the session owns its stepper
        session_id = uuid.uuid4().hex  # names this session's rows among shared rows
        keys = [(session_id, first) for first in stream_first_sizes(total_tokens, self.config)]
        self._release = weakref.finalize(self, _release_rows, self._rows, keys, rows is None)
        self._lock = threading.RLock()
        self._text = TextStream(model.tokenizer) if model.tokenizer is not None else None
        self._ids = np.zeros(0, dtype=np.int64)  # tokens [_base, tokens) some track needs
        self._base = 0
        self._tokens = 0
        self._final: Output | None = None
        self._closed = False
        self._tracks = [self._new_track(key, model.initial_state) for key in keys]

    @property
    def tokens(self) -> int:
        """Tokens read so far (special tokens removed; not the unfinished word)."""
        return self._tokens

    @property
    def closed(self) -> bool:
        return self._closed

    def feed(self, piece: Piece) -> None:
        """Read a piece: text (str, or UTF-8 bytes cut anywhere) or token ids; runs the
        segments it completes. A piece that is not text or ids raises InputError and
        leaves the session as it was."""
        with self._lock:
            self._check_open()
            snapshot = self._snapshot()
            try:
                if isinstance(piece, (str, bytes, bytearray)):
                    if self._text is None:
                        raise InputError("this model has no tokenizer; feed token ids")
                    ids = self._text.feed(piece)
                else:
                    ids = self._checked_ids(piece)
                    if self._text is not None:  # ids end the unfinished word
                        ids = np.concatenate([self._text.finish(), ids])
                ids = self._accepted(ids)
            except InputError:
                self._restore_snapshot(snapshot)
                raise
            self._append(ids)

    def result(self) -> Output | None:
        """What ``model.run_one`` gives on everything fed so far (the unfinished word
        counted as a word); None while no token has been read. Changes nothing."""
        with self._lock:
            if self._closed:
                return self._final
            extra = self._clean(self._text.peek()) if self._text is not None else None
            return self._outcome(extra)

    def close(self) -> Output | None:
        """End the document: read the unfinished word, run what is left, free the
        session; returns the final result (None if no token was read)."""
        with self._lock:
            if not self._closed:
                if self._text is not None:
                    self._append(self._accepted(self._text.finish()))
                try:
                    self._final = self._outcome(None)
                finally:
                    self.discard()
            return self._final

    def discard(self) -> None:
        """End the session without a result and free it (``close()`` gives the result)."""
        with self._lock:
            self._closed = True
            self._release()
            self._tracks, self._ids = [], self._ids[:0]

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc: object) -> None:
        """Leaving a ``with`` block frees the session; call ``close()`` in it for the
        final result."""
        self.discard()

    def save(self, metadata: dict[str, Any] | None = None) -> bytes:
        """The session's state as bytes (see ``state.py``); ``metadata`` (JSON-ready)
        replaces the metadata kept with it. ``StreamSession.restore`` reads it back."""
        with self._lock:
            self._check_open()
            kept = self.metadata if metadata is None else dict(metadata)
            state = self._rows.states([t.key for t in self._tracks])
            if not all(np.isfinite(array).all() for array in state.values()):
                raise NumericError("the session's state holds NaN or infinity, so it is not "
                                   "worth saving; the model or its inputs are damaged")
            meters = [t.meter.state if t.meter else MeterState(0.0, 0) for t in self._tracks]
            header = {
                "format": STATE_FORMAT, "version": STATE_VERSION,
                "model": self.model.identity, "variant": self.config.variant,
                "tokens": self._tokens, "base": self._base, "total_tokens": self.total_tokens,
                "text_tail": self._text.tail if self._text else "",
                "text_pending": self._text.pending.hex() if self._text else "",
                "text_started": self._text.started if self._text else False,
                "tracks": [{"first": t.first, "done": t.done, "nll": m.nll, "count": m.count}
                           for t, m in zip(self._tracks, meters, strict=True)],
                "metadata": kept,
            }
            arrays = {"ids": self._ids, **{STATE_PREFIX + name: array
                                           for name, array in state.items()}}
            if self.config.is_encoder:
                width = len(self.config.labels)
                arrays["logits"] = np.stack([np.zeros(width, np.float32) if t.logits is None
                                             else t.logits for t in self._tracks])
            else:
                width = self.config.vocab_size
                arrays["last"] = np.stack([np.zeros(width) if m.last is None else m.last
                                           for m in meters]).astype(np.float64)
            try:
                data = pack(header, arrays)
            except (TypeError, ValueError) as error:
                raise InputError(f"the state metadata cannot be saved ({error}); pass a dict "
                                 "of JSON values (str, numbers, lists, dicts)") from None
            self.metadata = kept
            return data

    def fork(self) -> StreamSession:
        """A copy that goes on by itself from what this session has read, on the same
        rows (its own stepper where this one has its own): read a context once, then
        fork it for each question; each fork's result is ``run_one(context +
        question)``."""
        with self._lock:
            return StreamSession.restore(self.model, self.save(), rows=self._shared_rows,
                                         name="the forked session")

    @classmethod
    def restore(cls, model: RMTModel, data: bytes, *, rows: Rows | None = None,
                name: str = "state") -> StreamSession:
        """A session from ``save()``'s bytes, on the model that saved it; anything else
        is an InputError naming ``name``."""
        header, arrays = unpack(data, name)
        if header.get("format") != STATE_FORMAT or header.get("version") != STATE_VERSION:
            raise InputError(f"{name}: not a session state this rmt-deploy reads (format "
                             f"{header.get('format')!r} version {header.get('version')!r})")
        if header.get("model") != model.identity:
            raise InputError(f"{name}: saved from another model (model sha256 "
                             f"{str(header.get('model'))[:12]}..., this one is "
                             f"{model.identity[:12]}...); restore it into the model that "
                             "saved it")
        session = None
        try:
            session = cls(model, total_tokens=header["total_tokens"], rows=rows)
            session._load(header, arrays)
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as error:
            if session is not None:
                session._release()
            raise InputError(f"{name}: state is malformed ({type(error).__name__}: {error}); "
                             "it was not written by this rmt-deploy") from None
        return session

    # -- internals --------------------------------------------------------------------

    def _load(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Take a saved state, checked against this model, in place of the fresh tracks."""
        config = self.config
        tracks = header["tracks"]
        width = len(config.labels) if config.is_encoder else config.vocab_size
        try:
            state = check_state(config, {pair.name_in: arrays.get(STATE_PREFIX + pair.name_in)
                                         for pair in state_pairs(config)}, len(tracks), "saved")
        except InputError as error:
            raise ValueError(str(error)) from None
        _check_array(arrays, "logits" if config.is_encoder else "last", (len(tracks), width))
        ids = arrays["ids"]
        if ids.ndim != 1 or (ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size)):
            raise ValueError(f"token ids of shape {ids.shape} outside [0, {config.vocab_size})")
        if [t["first"] for t in tracks] != [t.first for t in self._tracks]:
            raise ValueError("tracks do not match the model's segmentation")
        fresh, self._tracks = self._tracks, []
        for row, (saved, old) in enumerate(zip(tracks, fresh, strict=True)):
            self._rows.remove(old.key)
            track = self._new_track(old.key, {name: array[row]
                                              for name, array in state.items()})
            track.done = _count(saved["done"])
            if track.done:
                if config.is_encoder:
                    track.logits = arrays["logits"][row].astype(np.float32)
                else:
                    track.meter = PerplexityMeter(MeterState(
                        float(saved["nll"]), saved["count"], arrays["last"][row]))
            self._tracks.append(track)
        self._tokens, self._base = _count(header["tokens"]), _count(header["base"])
        self._ids = ids.astype(np.int64)
        if self._base + len(self._ids) != self._tokens or any(
                not self._base <= t.done <= self._tokens for t in self._tracks):
            raise ValueError("token counts do not add up")
        if self._text is not None:
            if not isinstance(header["text_tail"], str):
                raise ValueError("the unfinished text is not a str")
            started = header.get("text_started", self._tokens > 0)  # not in older files
            if not isinstance(started, bool):
                raise ValueError("text_started is not a bool")
            self._text = TextStream(self.model.tokenizer, header["text_tail"],
                                    bytes.fromhex(header["text_pending"]), started)
        metadata = header.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ValueError("metadata is not a dict")
        self.metadata = dict(metadata)

    def _new_track(self, key: tuple[str, int], state: dict[str, np.ndarray]) -> _Track:
        self._rows.add(key, state)
        return _Track(key[1], key, meter=None if self.config.is_encoder else PerplexityMeter())

    def _check_open(self) -> None:
        if self._closed:
            raise InputError("the session is closed; open a new one")

    def _snapshot(self) -> tuple[str, bytes, bool] | None:
        text = self._text
        return (text.tail, text.pending, text.started) if text is not None else None

    def _restore_snapshot(self, snapshot: tuple[str, bytes, bool] | None) -> None:
        if snapshot is not None:
            self._text = TextStream(self.model.tokenizer, *snapshot)

    def _checked_ids(self, piece: Any) -> np.ndarray:
        if not isinstance(piece, (Sequence, np.ndarray)):
            raise InputError(f"a piece is text (str or UTF-8 bytes) or token ids, got "
                             f"{type(piece).__name__}")
        try:
            source = ArraySource(piece, self.config)
        except (TypeError, ValueError):
            raise InputError(f"token ids must be a 1-D sequence of integers, got "
                             f"{type(piece).__name__}") from None
        return source.tokens(0, len(source))

    def _clean(self, ids: np.ndarray) -> np.ndarray:
        """Checked against the vocabulary, special tokens stripped, cut to what
        ``max_n_segments`` leaves room for."""
        check_tokenizer_ids(ids, self.config)
        ids = strip_special(ids, self.config)
        return ids[: usable_tokens(self._tokens + len(ids), self.config) - self._tokens]

    def _accepted(self, ids: np.ndarray) -> np.ndarray:
        """The ids the session reads of a piece's ids; raises before reading any."""
        ids = self._clean(ids)
        if self.total_tokens is not None and self._tokens + len(ids) > self.total_tokens:
            raise InputError(f"the session was opened for {self.total_tokens} tokens and this "
                             f"piece brings it to {self._tokens + len(ids)}; open it without "
                             "total_tokens")
        return ids

    def _append(self, ids: np.ndarray) -> None:
        """Read ids and run every segment they complete."""
        if not len(ids):
            return
        self._ids = np.concatenate([self._ids, ids])
        self._tokens += len(ids)
        while ready := [t for t in self._tracks if self._end(t) <= self._tokens]:
            self._step(self._rows, ready, self._ids, self._tokens)
        low = min(t.done for t in self._tracks)
        self._ids, self._base = self._ids[low - self._base:], low

    def _step(self, rows: Rows, tracks: list[_Track], ids: np.ndarray, end: int) -> None:
        """Run the next segment of each track in ``rows`` (``ids`` start at ``_base``; none
        past ``end``)."""
        segments = [ids[t.done - self._base: min(self._end(t), end) - self._base]
                    for t in tracks]
        logits = rows.step([t.key for t in tracks], segments)
        for row, (track, tokens) in enumerate(zip(tracks, segments, strict=True)):
            if track.meter is not None:
                track.meter.add(tokens, logits[row, : len(tokens)])
            else:
                track.logits = logits[row]
            track.done += len(tokens)

    def _outcome(self, extra: np.ndarray | None) -> Output | None:
        """The result with ``extra`` tokens appended, computed on a copy."""
        total = self._tokens + (0 if extra is None else len(extra))
        if total == 0:
            return None
        track = self._track_for(total).copy()
        ids = self._ids if extra is None else np.concatenate([self._ids, extra])
        state = self._rows.state(track.key)
        if track.done < total:  # the rest runs on a copy: the session stays as it is
            with Stepper(self.model.engine) as scratch:
                scratch.add(track.key, state)
                while track.done < total:
                    self._step(scratch, [track], ids, total)
                state = scratch.state(track.key)
        memory = state[reported(self.config).name_in]
        if not all(np.isfinite(array).all() for array in state.values()) or (
                track.logits is not None and not np.isfinite(track.logits).all()) or (
                track.meter is not None and not np.isfinite(track.meter.nll)):
            raise NumericError("the model produced NaN or infinity (in its state or "
                               "logits); the export or its weights are damaged: re-export it")
        if self.config.is_encoder:
            return encoder_output(self.config, track.logits, memory, total)
        return decoder_output(self.config, track.meter.perplexity, memory, total)

    def _end(self, track: _Track) -> int:
        """Where the track's next segment ends (unless the document ends sooner)."""
        return segment_end(track.done, track.first, self.config)

    def _track_for(self, total: int) -> _Track:
        first = first_size(total, self.config)
        for track in self._tracks:
            if track.first == first:
                return track
        raise InputError(f"the session was opened for {self.total_tokens} tokens but has "
                         f"{total}; feed the rest of the document, or open it without "
                         "total_tokens")


def _release_rows(rows: Rows, keys: list[tuple[str, int]], owned: bool) -> None:
    """Free a session's rows: its own stepper, or its rows among shared ones."""
    if owned:
        rows.close()
    else:
        for key in keys:
            rows.remove(key)


def _check_array(arrays: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> None:
    array = arrays[name]
    if array.shape != shape or not np.isfinite(array).all():
        raise ValueError(f"{name} has shape {array.shape} (this model's: {shape}) or holds "
                         "NaN or infinity")


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value
