"""The PyTorch reference as a backend: runs a checkpoint directly (needs torch)."""

from __future__ import annotations

from typing import Any

import numpy as np

from rmt_deploy.runtime.backends.base import StepEngine


class TorchEngine(StepEngine):
    name = "torch"

    def __init__(self, rmt: Any, threads: int | None = None) -> None:
        import torch

        self._torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.rmt = rmt.eval()
        self.config = rmt.rmt_config
        self.precision = "fp32"

    def initial_memory(self) -> np.ndarray:
        with self._torch.no_grad():
            return self.rmt.initial_memory(1)[0].detach().cpu().numpy().astype(np.float32)

    def new_state(self, memory: np.ndarray) -> dict[str, Any]:
        return {"memory": self._torch.from_numpy(np.array(memory, dtype=np.float32))}

    def memory(self, state: dict[str, Any]) -> np.ndarray:
        return state["memory"].numpy().copy()

    def step(self, state: dict[str, Any], input_ids: np.ndarray,
             attention_mask: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            logits, state["memory"] = self.rmt(
                torch.from_numpy(input_ids), torch.from_numpy(attention_mask), state["memory"])
        return logits.numpy()

    def read(self, state: dict[str, Any], input_ids: np.ndarray,
             attention_mask: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            return self.rmt.read(torch.from_numpy(input_ids), torch.from_numpy(attention_mask),
                                 state["memory"]).numpy()
