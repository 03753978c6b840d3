"""The PyTorch reference as a backend: runs a checkpoint directly (needs torch)."""

from __future__ import annotations

from typing import Any

import numpy as np

from rmt_deploy.runtime.backends.base import StepEngine


class TorchEngine(StepEngine):
    name = "torch"

    def __init__(self, rmt: Any, threads: int | None = None, device: str = "cpu",
                 half: bool = False) -> None:
        """``half`` runs the model in fp16 (on a GPU); memory stays fp32 between steps."""
        import torch

        self._torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.rmt = rmt.eval().to(self.device, torch.float16 if half else torch.float32)
        self.config = rmt.rmt_config
        self.precision = "fp16" if half else "fp32"

    def initial_memory(self) -> np.ndarray:
        with self._torch.no_grad():
            return self.rmt.initial_memory(1)[0].float().cpu().numpy()

    def _tensor(self, array: np.ndarray) -> Any:
        return self._torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def new_state(self, memory: np.ndarray) -> dict[str, Any]:
        return {"memory": self._tensor(np.asarray(memory, dtype=np.float32))}

    def memory(self, state: dict[str, Any]) -> np.ndarray:
        return state["memory"].cpu().numpy().copy()

    def step(self, state: dict[str, Any], input_ids: np.ndarray,
             attention_mask: np.ndarray) -> np.ndarray:
        with self._torch.no_grad():
            logits, memory = self.rmt(self._tensor(input_ids), self._tensor(attention_mask),
                                      state["memory"])
        state["memory"] = memory.float()
        return logits.float().cpu().numpy()

    def read(self, state: dict[str, Any], input_ids: np.ndarray,
             attention_mask: np.ndarray) -> np.ndarray:
        with self._torch.no_grad():
            logits = self.rmt.read(self._tensor(input_ids), self._tensor(attention_mask),
                                   state["memory"])
        return logits.float().cpu().numpy()
