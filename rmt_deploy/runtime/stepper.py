"""The one place segments are stepped. A :class:`Stepper` holds the recurrent state (every
pair the contract declares) of a set of keyed rows (the documents of a run, the tracks
of a session, the sequences a server keeps) for their whole life, in the engine's own
buffers between steps.

The rows of the last step stay resident in one engine state; stepping the same rows
again moves no state. State crosses to the host only when a caller asks for it
(:meth:`Stepper.state`) or when a step takes other rows than the last (their state is
then gathered into an engine state of the new size, kept for reuse). Every path that steps
segments goes through here: ``RMTModel.run``, stream sessions, the session pool's
batcher, the Triton python backend, export validation and calibration recording.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np

from rmt_deploy.errors import InputError
from rmt_deploy.runtime.backends.base import EngineState, State, StepEngine
from rmt_deploy.runtime.generation import GenerationOptions, TokenChooser, generate
from rmt_deploy.segmentation import step_inputs

MAX_STATES = 8  # engine states kept for reuse, one per batch size, least recently used out


class Stepper:
    """Rows by key, their state, and the engine states that step them. Thread-safe: calls
    serialize. Close it (or use it in ``with``) to free the engine states."""

    def __init__(self, engine: StepEngine) -> None:
        self.engine = engine
        self.config = engine.config
        self._host: dict[Hashable, State] = {}  # every live row's state, as last synced
        self._rows: list[Hashable] = []  # the rows of the resident state, in its order
        self._state: EngineState | None = None
        self._stale = False  # the resident state is newer than the host copies
        self._states: OrderedDict[int, EngineState] = OrderedDict()  # by batch size
        self._lock = threading.RLock()
        self._closed = False
        self._seen: dict[bool, list[float]] = {}  # batch-1 steps by logits: [count, seconds]

    def __len__(self) -> int:
        return len(self._host)

    def __contains__(self, key: object) -> bool:
        return key in self._host

    def add(self, key: Hashable, state: Mapping[str, np.ndarray]) -> None:
        """A new row whose state is ``state`` (one row's, every pair the engine carries,
        as :func:`~rmt_deploy.contract.check_state` accepts it; copied)."""
        with self._lock:
            self._check_open()
            if key in self._host:
                raise InputError(f"row {key!r} is already stepped here; remove it first")
            if key in self._rows:  # removed while resident: the state's copy is the old row
                if self._stale:
                    self._sync()
                self._state, self._rows = None, []
            self._host[key] = {name: np.array(array) for name, array in state.items()}

    def remove(self, key: Hashable) -> None:
        """Forget a row (nothing happens if it is not there)."""
        with self._lock:
            self._host.pop(key, None)

    def state(self, key: Hashable) -> State:
        """A host copy of one row's state."""
        return {name: array[0] for name, array in self.states([key]).items()}

    def states(self, keys: Sequence[Hashable]) -> State:
        """Host copies of some rows' state, every pair ``[len(keys), ...]``: one transfer
        at most."""
        with self._lock:
            if self._stale and any(key in self._rows for key in keys):
                self._sync()
            return _stacked([self._host[self._known(key)] for key in keys])

    def zero(self, keys: Sequence[Hashable], names: Sequence[str]) -> None:
        """Set the state pairs ``names`` (input names) of rows ``keys`` to zeros; the next
        step loads them."""
        with self._lock:
            resident = any(key in self._rows for key in keys)
            if self._stale and resident:
                self._sync()
            for key in keys:
                row = self._host[self._known(key)]
                row.update((name, np.zeros_like(row[name])) for name in names)
            if resident:
                self._state, self._rows = None, []

    def step(self, keys: Sequence[Hashable], segments: Sequence[np.ndarray],
             logits: bool = True) -> np.ndarray | None:
        """One segment of each row ``keys[i]``: ``segments[i]`` (content token ids). Returns
        the logits in ``keys`` order, or None with ``logits=False``."""
        input_ids, attention_mask = step_inputs(segments, self.config)
        return self.run(keys, input_ids, attention_mask, logits)

    def run(self, keys: Sequence[Hashable], input_ids: np.ndarray,
            attention_mask: np.ndarray, logits: bool = True) -> np.ndarray | None:
        """:meth:`step` with the step's tensors already laid out. More rows than the
        engine takes at once (its ``max_batch``: a TensorRT profile) are split into steps
        of at most that many rows, each resident in turn."""
        limit = self.engine.max_batch
        if limit is not None and len(keys) > limit:
            with self._lock:  # the parts, too, are one call
                parts = [self.run(keys[i: i + limit], input_ids[i: i + limit],
                                  attention_mask[i: i + limit], logits)
                         for i in range(0, len(keys), limit)]
            return np.concatenate(parts) if logits and parts[0] is not None else None
        with self._lock:
            state, order = self._resident(keys)
            if order is not None:  # the resident rows in another order: permute, not reload
                input_ids, attention_mask = input_ids[order], attention_mask[order]
            self._stale = True
            started = time.perf_counter()
            result = state.step(input_ids, attention_mask, logits)
            if len(keys) == 1:
                self._time(logits, time.perf_counter() - started)
            if result is not None and order is not None:
                result = result[np.argsort(order)]
            return result

    def seen(self, logits: bool) -> tuple[int, float]:
        """How many batch-1 steps with (or without) logits ran here, and their mean ms
        (the first, which allocates, not counted)."""
        count, seconds = self._seen.get(logits, (0, 0.0))
        return int(count), 1000 * seconds / count if count else 0.0

    def _time(self, logits: bool, seconds: float) -> None:
        if logits not in self._seen:
            self._seen[logits] = [0, 0.0]  # the first step: allocations, first run
            return
        self._seen[logits][0] += 1
        self._seen[logits][1] += seconds

    def generate(self, keys: Sequence[Hashable], segments: Sequence[np.ndarray],
                 options: GenerationOptions,
                 on_logits: Callable[[np.ndarray], None] | None = None,
                 on_tokens: Callable[[np.ndarray], None] | None = None) -> list[list[int]]:
        """Decoders: the tokens each row ``keys[i]`` generates after ``segments[i]``, from
        its state (which generation leaves unchanged); ``on_logits`` sees every step's
        logits, ``on_tokens`` its chosen tokens (rows in ``keys`` order). More rows than
        the engine takes at once (its ``max_batch``) generate in parts of at most that
        many rows, one part after the other (the callbacks see each part's steps in
        turn; sampling goes on with one random stream, so sampled ids depend on how the
        rows are batched, as they do on which rows are batched together)."""
        limit = self.engine.max_batch or max(len(keys), 1)
        choose = TokenChooser(options)
        with self._lock:  # the parts, too, are one call
            return [ids for start in range(0, len(keys), limit)
                    for ids in self._generate(keys[start: start + limit],
                                              segments[start: start + limit], options,
                                              on_logits, on_tokens, choose)]

    def _generate(self, keys, segments, options, on_logits, on_tokens,
                  choose: TokenChooser) -> list[list[int]]:
        state, order = self._resident(keys)
        if order is None:
            return generate(state, self.config, segments, options, on_logits, on_tokens,
                            choose)
        back = np.argsort(order)
        shown = None if on_logits is None else (lambda logits: on_logits(logits[back]))
        made = None if on_tokens is None else (lambda tokens: on_tokens(tokens[back]))
        generated = generate(state, self.config, [segments[i] for i in order], options,
                             shown, made, choose)
        return [generated[i] for i in back]

    def close(self) -> None:
        """Free every engine state; rows are forgotten."""
        with self._lock:
            self._closed = True
            for state in self._states.values():
                state.close()
            self._states.clear()
            self._state, self._rows, self._host = None, [], {}

    def __enter__(self) -> Stepper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise InputError("this stepper is closed; open a new run or session")

    def _known(self, key: Hashable) -> Hashable:
        if key not in self._host:
            raise InputError(f"row {key!r} is not stepped here (never added, or removed)")
        return key

    def _resident(self, keys: Sequence[Hashable]) -> tuple[EngineState, np.ndarray | None]:
        """The state holding exactly ``keys``' rows, and the permutation from ``keys``
        order to the state's (None: same order)."""
        self._check_open()
        keys = [self._known(key) for key in keys]
        if len(set(keys)) != len(keys):
            raise InputError("a step takes each row at most once")
        if self._state is not None and len(keys) == len(self._rows):
            if keys == self._rows:
                return self._state, None
            if set(keys) == set(self._rows):
                position = {key: i for i, key in enumerate(keys)}
                return self._state, np.array([position[key] for key in self._rows])
        if self._stale:
            self._sync()
        rows = _stacked([self._host[key] for key in keys])
        state = self._states.pop(len(keys), None)
        if state is None:
            state = self.engine.new_state(rows)
        else:
            state.load(rows)
        self._states[len(keys)] = state
        while len(self._states) > MAX_STATES:
            self._states.popitem(last=False)[1].close()
        self._state, self._rows = state, keys
        return state, None

    def _sync(self) -> None:
        """Copy the resident state to the host copies of its live rows."""
        resident = self._state.state()
        for row, key in enumerate(self._rows):
            if key in self._host:
                self._host[key] = {name: array[row] for name, array in resident.items()}
        self._stale = False


def _stacked(rows: Sequence[State]) -> State:
    """Rows' states as one batch, pair by pair."""
    return {name: np.stack([row[name] for row in rows]) for name in rows[0]}
