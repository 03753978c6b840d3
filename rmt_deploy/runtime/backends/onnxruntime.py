"""ONNX Runtime backend: CPU, or CUDA with IOBinding where onnxruntime-gpu is installed."""

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


@dataclass
class _State:
    buffers: list[Any]  # two OrtValues [batch, M, H]: memory_in / memory_out, swapped
    parity: int = 0


class OnnxRuntimeEngine(StepEngine):
    name = "onnxruntime"

    def __init__(self, manifest: Manifest, threads: int | None = None,
                 precision: str = "fp32", device: str | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("onnxruntime is not installed: pip install onnxruntime "
                               "(or onnxruntime-gpu)") from None
        self._ort = ort
        self.config = manifest.config
        available = ort.get_available_providers()
        if device is None:
            device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise BackendError("onnxruntime has no CUDA provider here: pip install "
                               "onnxruntime-gpu, or use the CPU")
        self.device = device
        providers = (["CUDAExecutionProvider"] if device == "cuda" else []) + [
            "CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self._sessions = {}
        for name, key in precision_graphs(manifest, precision).items():
            if key in manifest.graphs:
                path = manifest.path(manifest.graphs[key].file)
                try:
                    self._sessions[name] = ort.InferenceSession(str(path), options,
                                                                providers=providers)
                except Exception as error:  # ORT raises its own non-exported types
                    first = str(error).strip().splitlines()[0][:200]
                    raise BackendError(f"{path}: ONNX Runtime cannot load it ({first}); "
                                       "re-export the model") from None
        self.precision = precision

    def new_state(self, memory: np.ndarray) -> _State:
        value = self._ort.OrtValue.ortvalue_from_numpy(  # a copy: it is written to
            np.array(memory, dtype=np.float32, order="C"), self.device)
        spare = self._ort.OrtValue.ortvalue_from_shape_and_type(
            memory.shape, np.float32, self.device)
        return _State([value, spare])

    def memory(self, state: _State) -> np.ndarray:
        return state.buffers[state.parity].numpy().copy()

    def _bind(self, session: Any, state: _State, input_ids: np.ndarray,
              attention_mask: np.ndarray) -> Any:
        binding = session.io_binding()
        binding.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input(ATTENTION_MASK,
                               np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_ortvalue_input(MEMORY_IN, state.buffers[state.parity])
        binding.bind_output(LOGITS, "cpu")
        return binding

    def step(self, state: _State, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        session = self._sessions[STEP_GRAPH]
        binding = self._bind(session, state, input_ids, attention_mask)
        binding.bind_ortvalue_output(MEMORY_OUT, state.buffers[1 - state.parity])
        session.run_with_iobinding(binding)
        state.parity ^= 1
        return binding.get_outputs()[0].numpy()

    def read(self, state: _State, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        session = self._sessions.get(READ_GRAPH)
        if session is None:
            raise BackendError(NO_READ_GRAPH)
        binding = self._bind(session, state, input_ids, attention_mask)
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()
