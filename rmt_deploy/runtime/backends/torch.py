"""The PyTorch reference as a backend: runs a checkpoint directly (needs torch)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from rmt_deploy.contract import (
    FILE,
    decode_reads,
    generation_reads,
    start_state,
    state_pairs,
    variant_names,
)
from rmt_deploy.runtime.backends.base import EngineState, State, StepEngine, rows_of


class TorchEngine(StepEngine):
    name = "torch"

    def __init__(self, rmt: Any, threads: int | None = None, device: str = "cpu",
                 half: bool = False) -> None:
        """``half`` runs the model in fp16 (on a GPU); the state keeps its own dtype between
        steps."""
        import torch

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.rmt = rmt.eval().to(self.device, torch.float16 if half else torch.float32)
        self.config = rmt.rmt_config
        self.precision = "fp16" if half else "fp32"
        self.graphs = frozenset(variant_names(self.config))

    def initial_state(self) -> State:
        """One row's initial state, by input name: the reference's learned values
        (``rmt.initial_state``; a plain RMT has its memory), the files the contract
        names, zeros."""
        with self.torch.no_grad():
            if hasattr(self.rmt, "initial_state"):
                learned = self.rmt.initial_state(1)
            else:
                learned = {state_pairs(self.config)[0].name_in: self.rmt.initial_memory(1)}
        learned = {name: value[0].detach().float().cpu().numpy() for name, value in learned.items()}
        learned.update((pair.name_in, np.load(pair.file, allow_pickle=False))
                       for pair in state_pairs(self.config) if pair.initial == FILE)
        return start_state(self.config, learned)

    def tensor(self, array: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def new_state(self, state: Mapping[str, np.ndarray]) -> _State:
        engine_state = _State(self, rows_of(state))
        engine_state.load(state)
        return engine_state


class _State(EngineState):
    """The state pairs as tensors on the engine's device, in the contract's order (the
    order the reference's methods take and return them)."""

    def __init__(self, engine: TorchEngine, batch: int) -> None:
        super().__init__(batch)
        self._engine = engine
        self._pairs = state_pairs(engine.config)
        self._state: list[Any] = []

    def _reads(self, pairs: tuple) -> list[Any]:
        """The state tensors of ``pairs``, in the contract's order."""
        return [value for p, value in zip(self._pairs, self._state, strict=True) if p in pairs]

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        self._state = [self._engine.tensor(np.array(state[p.name_in], dtype=p.dtype))
                       for p in self._pairs]

    def state(self) -> State:
        return {p.name_in: value.cpu().numpy().copy()
                for p, value in zip(self._pairs, self._state, strict=True)}

    def _keep(self, written: Any) -> None:
        written = written if isinstance(written, (tuple, list)) else (written,)
        self._state = [value.to(getattr(self._engine.torch, p.dtype))
                       for p, value in zip(self._pairs, written, strict=True)]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             logits: bool = True) -> np.ndarray | None:
        engine = self._engine
        ids, mask = engine.tensor(input_ids), engine.tensor(attention_mask)
        with engine.torch.no_grad():
            if not logits:
                self._keep(engine.rmt.write(ids, mask, *self._state))
                return None
            result, *written = engine.rmt(ids, mask, *self._state)
        self._keep(written)
        return result.float().cpu().numpy()

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                capacity: int | None = None) -> tuple[np.ndarray, list[Any]]:
        engine = self._engine
        with engine.torch.no_grad():
            logits, *cache = engine.rmt.prefill(engine.tensor(input_ids),
                                                engine.tensor(attention_mask),
                                                *self._reads(generation_reads(engine.config)))
        return logits.float().cpu().numpy(), cache

    def decode(self, cache: list[Any], input_ids: np.ndarray, attention_mask: np.ndarray
               ) -> tuple[np.ndarray, list[Any]]:
        engine = self._engine
        with engine.torch.no_grad():
            logits, *cache = engine.rmt.decode(engine.tensor(input_ids),
                                               engine.tensor(attention_mask),
                                               *self._reads(decode_reads(engine.config)), *cache)
        return logits.float().cpu().numpy(), cache
