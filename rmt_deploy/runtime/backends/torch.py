"""The PyTorch reference as a backend: runs a checkpoint directly (needs torch)."""

from __future__ import annotations

from typing import Any

import numpy as np

from rmt_deploy.contract import DECODE, PREFILL, STEP, WRITE
from rmt_deploy.runtime.backends.base import EngineState, StepEngine


class TorchEngine(StepEngine):
    name = "torch"

    def __init__(self, rmt: Any, threads: int | None = None, device: str = "cpu",
                 half: bool = False) -> None:
        """``half`` runs the model in fp16 (on a GPU); memory stays fp32 between steps."""
        import torch

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.rmt = rmt.eval().to(self.device, torch.float16 if half else torch.float32)
        self.config = rmt.rmt_config
        self.precision = "fp16" if half else "fp32"
        self.graphs = frozenset({STEP, WRITE} if self.config.is_encoder else
                                {STEP, WRITE, PREFILL, DECODE})

    def initial_memory(self) -> np.ndarray:
        with self.torch.no_grad():
            return self.rmt.initial_memory(1)[0].float().cpu().numpy()

    def tensor(self, array: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def new_state(self, memory: np.ndarray) -> _State:
        state = _State(self, len(memory))
        state.load(memory)
        return state


class _State(EngineState):
    def __init__(self, engine: TorchEngine, batch: int) -> None:
        super().__init__(batch)
        self._engine = engine
        self._memory: Any = None

    def load(self, memory: np.ndarray) -> None:
        self._memory = self._engine.tensor(np.array(memory, dtype=np.float32))

    def memory(self) -> np.ndarray:
        return self._memory.cpu().numpy().copy()

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             logits: bool = True) -> np.ndarray | None:
        engine = self._engine
        ids, mask = engine.tensor(input_ids), engine.tensor(attention_mask)
        with engine.torch.no_grad():
            if not logits:
                self._memory = engine.rmt.write(ids, mask, self._memory).float()
                return None
            result, memory = engine.rmt(ids, mask, self._memory)
        self._memory = memory.float()
        return result.float().cpu().numpy()

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                capacity: int | None = None) -> tuple[np.ndarray, list[Any]]:
        engine = self._engine
        with engine.torch.no_grad():
            logits, *cache = engine.rmt.prefill(engine.tensor(input_ids),
                                                engine.tensor(attention_mask), self._memory)
        return logits.float().cpu().numpy(), cache

    def decode(self, cache: list[Any], input_ids: np.ndarray, attention_mask: np.ndarray
               ) -> tuple[np.ndarray, list[Any]]:
        engine = self._engine
        with engine.torch.no_grad():
            logits, *cache = engine.rmt.decode(engine.tensor(input_ids),
                                               engine.tensor(attention_mask), *cache)
        return logits.float().cpu().numpy(), cache
