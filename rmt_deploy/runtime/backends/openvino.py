"""OpenVINO backend for CPUs: the same ONNX graph, compiled for the host CPU, in BF16
where the CPU computes it natively (AMX / AVX-512 BF16) and FP32 elsewhere."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rmt_deploy.errors import BackendError
from rmt_deploy.manifest import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    MEMORY_IN,
    MEMORY_OUT,
    READ_GRAPH,
    STEP_GRAPH,
    Manifest,
)
from rmt_deploy.runtime.backends.base import NO_READ_GRAPH, StepEngine, precision_graphs


def cpu_precision() -> str:
    """``bf16`` where OpenVINO can compute BF16 on this CPU, else ``fp32``."""
    import openvino as ov

    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "bf16" if "BF16" in capabilities else "fp32"


@dataclass
class _State:
    requests: dict[str, Any]  # one infer request per graph: requests are not thread-safe
    buffers: list[Any]  # two ov.Tensor [batch, M, H]: memory_in / memory_out, swapped
    parity: int = 0


class OpenVinoEngine(StepEngine):
    name = "openvino"

    def __init__(self, manifest: Manifest, threads: int | None = None,
                 precision: str | None = None, graphs: str = "fp32") -> None:
        """``precision``: what OpenVINO computes in (default: bf16 where the CPU has it);
        ``graphs``: which of the export's graphs to compile (fp32 or fp16 weights)."""
        try:
            import openvino as ov
        except ImportError:
            raise BackendError("openvino is not installed: pip install openvino") from None
        self._ov = ov
        self.config = manifest.config
        self.precision = precision or cpu_precision()
        if self.precision not in ("fp32", "bf16"):
            raise BackendError(f"the openvino backend runs fp32 or bf16, not {self.precision}")
        options: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads:
            options["INFERENCE_NUM_THREADS"] = threads
        core = ov.Core()
        self._compiled = {}
        for name, key in precision_graphs(manifest, graphs).items():
            if key in manifest.graphs:
                path = manifest.path(manifest.graphs[key].file)
                try:
                    self._compiled[name] = core.compile_model(core.read_model(str(path)), "CPU",
                                                              options)
                except RuntimeError as error:
                    first = str(error).strip().splitlines()[0][:200]
                    raise BackendError(f"{path}: OpenVINO cannot compile it ({first}); "
                                       "re-export the model") from None

    def new_state(self, memory: np.ndarray) -> _State:
        buffers = [self._ov.Tensor(np.array(memory, dtype=np.float32, order="C")),  # a copy
                   self._ov.Tensor(self._ov.Type.f32, memory.shape)]
        requests = {name: model.create_infer_request() for name, model in self._compiled.items()}
        return _State(requests, buffers)

    def memory(self, state: _State) -> np.ndarray:
        return np.array(state.buffers[state.parity].data, copy=True)

    def _feed(self, request: Any, state: _State, input_ids: np.ndarray,
              attention_mask: np.ndarray) -> None:
        ov = self._ov
        request.set_tensor(INPUT_IDS, ov.Tensor(np.ascontiguousarray(input_ids, np.int64)))
        request.set_tensor(ATTENTION_MASK,
                           ov.Tensor(np.ascontiguousarray(attention_mask, np.int64)))
        request.set_tensor(MEMORY_IN, state.buffers[state.parity])

    def step(self, state: _State, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        request = state.requests[STEP_GRAPH]
        self._feed(request, state, input_ids, attention_mask)
        request.set_tensor(MEMORY_OUT, state.buffers[1 - state.parity])
        request.infer()
        state.parity ^= 1
        return np.array(request.get_tensor(LOGITS).data, dtype=np.float32)

    def read(self, state: _State, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        request = state.requests.get(READ_GRAPH)
        if request is None:
            raise BackendError(NO_READ_GRAPH)
        self._feed(request, state, input_ids, attention_mask)
        request.infer()
        return np.array(request.get_tensor(LOGITS).data, dtype=np.float32)
