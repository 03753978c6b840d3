"""Many stream sessions on one opened model, by id, for a service: each session keeps its
own memory, and their segment steps run batched together (``StepBatcher``)."""

from __future__ import annotations

import threading
import uuid

from rmt_deploy.errors import InputError
from rmt_deploy.runtime.batcher import StepBatcher
from rmt_deploy.runtime.model import RMTModel
from rmt_deploy.runtime.session import Output, Piece, StreamSession


class SessionPool:
    """Sessions by id; every method is safe to call from any thread.

    ``batch=False`` runs each session's steps in its caller's thread instead of
    batching them (``max_rows``: most rows in one batched step)."""

    def __init__(self, model: RMTModel, batch: bool = True, max_rows: int = 64) -> None:
        self.model = model
        self.batcher = StepBatcher(model.engine, max_rows) if batch else None
        self._sessions: dict[str, StreamSession] = {}
        self._lock = threading.Lock()

    def open(self, session_id: str | None = None, *, total_tokens: int | None = None) -> str:
        """Start a session; returns its id (a new random one unless given)."""
        return self._add(StreamSession(self.model, total_tokens=total_tokens,
                                       rows=self.batcher), session_id)

    def restore(self, data: bytes, session_id: str | None = None) -> str:
        """Start a session from saved state (``save``); returns its id."""
        return self._add(StreamSession.restore(self.model, data, rows=self.batcher),
                         session_id)

    def get(self, session_id: str) -> StreamSession:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise InputError(f"unknown session {session_id!r}: never opened, or already "
                             "closed; open a session first")
        return session

    def feed(self, session_id: str, piece: Piece) -> None:
        self.get(session_id).feed(piece)

    def result(self, session_id: str) -> Output | None:
        return self.get(session_id).result()

    def save(self, session_id: str) -> bytes:
        return self.get(session_id).save()

    def close(self, session_id: str) -> Output | None:
        """End a session and forget it; returns its final result."""
        output = self.get(session_id).close()
        with self._lock:
            self._sessions.pop(session_id, None)
        return output

    def shutdown(self) -> None:
        """Close every session, stop the batching thread and free its engine states."""
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.discard()
        if self.batcher is not None:
            self.batcher.close()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    def __enter__(self) -> SessionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _add(self, session: StreamSession, session_id: str | None) -> str:
        if session_id is None:
            session_id = uuid.uuid4().hex
        elif not isinstance(session_id, str) or not session_id:
            raise InputError(f"a session id is a non-empty str, got {session_id!r}")
        with self._lock:
            if session_id in self._sessions:
                raise InputError(f"session {session_id!r} is already open; close it first or "
                                 "pick another id")
            self._sessions[session_id] = session
        return session_id
