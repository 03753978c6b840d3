"""ONNX Runtime backend: CPU, or CUDA with IOBinding where onnxruntime-gpu is installed.

A state holds two memory OrtValues swapped each step, and one IOBinding per (graph,
width, parity) bound once to its own input and output OrtValues, so a step only copies
the token ids in and, where they are read, the logits out."""

from __future__ import annotations

from typing import Any

import numpy as np

from rmt_deploy.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    MEMORY_IN,
    MEMORY_OUT,
    READ,
    STEP,
    WRITE,
)
from rmt_deploy.errors import BackendError
from rmt_deploy.manifest import Manifest
from rmt_deploy.runtime.backends.base import (
    NO_READ_GRAPH,
    EngineState,
    StepEngine,
    check_io,
    precision_graphs,
)
from rmt_deploy.runtime.options import RuntimeOptions

_TYPES = {"tensor(int64)": "int64", "tensor(float)": "float32", "tensor(float16)": "float16"}


class OnnxRuntimeEngine(StepEngine):
    name = "onnxruntime"

    def __init__(self, manifest: Manifest, options: RuntimeOptions | None = None,
                 device: str | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("onnxruntime is not installed: pip install onnxruntime "
                               "(or onnxruntime-gpu)") from None
        options = options or RuntimeOptions()
        self._ort = ort
        self.config = manifest.config
        self.precision = options.precision
        available = ort.get_available_providers()
        if device is None:
            device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise BackendError("onnxruntime has no CUDA provider here: pip install "
                               "onnxruntime-gpu, or use the CPU")
        self.device = device
        providers = (["CUDAExecutionProvider"] if device == "cuda" else []) + [
            "CPUExecutionProvider"]
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if options.threads:
            session_options.intra_op_num_threads = options.threads
        self.sessions: dict[str, Any] = {}
        for graph, key in precision_graphs(manifest, options.precision).items():
            spec = manifest.graphs[key]
            path = manifest.path(spec.file)
            try:
                session = ort.InferenceSession(str(path), session_options, providers=providers)
            except Exception as error:  # ORT raises its own non-exported types
                first = str(error).strip().splitlines()[0][:200]
                raise BackendError(f"{path}: ONNX Runtime cannot load it ({first}); "
                                   "re-export the model") from None
            for kind, declared, actual in (("input", spec.inputs, session.get_inputs()),
                                           ("output", spec.outputs, session.get_outputs())):
                check_io(str(path), declared, {a.name: (_TYPES.get(a.type, a.type),
                                                        tuple(a.shape)) for a in actual}, kind)
            self.sessions[graph] = session
        self.graphs = frozenset(self.sessions)

    def new_state(self, memory: np.ndarray) -> _State:
        state = _State(self, len(memory))
        state.load(memory)
        return state

    def ortvalue(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self._ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.device)


class _Binding:
    """One graph's IOBinding at one input width and memory parity."""

    def __init__(self, engine: OnnxRuntimeEngine, graph: str, memory_in: Any,
                 memory_out: Any | None, shape: tuple[int, int]) -> None:
        config = engine.config
        self.session = engine.sessions[graph]
        self.binding = self.session.io_binding()
        self.ids, self.mask = engine.ortvalue(shape, np.int64), engine.ortvalue(shape, np.int64)
        self.binding.bind_ortvalue_input(INPUT_IDS, self.ids)
        self.binding.bind_ortvalue_input(ATTENTION_MASK, self.mask)
        self.binding.bind_ortvalue_input(MEMORY_IN, memory_in)
        self.logits = None
        if graph != WRITE:
            logits_shape = ((shape[0], len(config.labels)) if config.is_encoder
                            else (*shape, config.vocab_size))
            self.logits = engine.ortvalue(logits_shape, np.float32)
            self.binding.bind_ortvalue_output(LOGITS, self.logits)
        if memory_out is not None:
            self.binding.bind_ortvalue_output(MEMORY_OUT, memory_out)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, logits: bool
            ) -> np.ndarray | None:
        self.ids.update_inplace(np.ascontiguousarray(input_ids, dtype=np.int64))
        self.mask.update_inplace(np.ascontiguousarray(attention_mask, dtype=np.int64))
        self.session.run_with_iobinding(self.binding)
        return self.logits.numpy().copy() if logits and self.logits is not None else None


class _State(EngineState):
    def __init__(self, engine: OnnxRuntimeEngine, batch: int) -> None:
        super().__init__(batch)
        config = engine.config
        self._engine = engine
        shape = (batch, config.num_mem_tokens, config.hidden_size)
        self._buffers = [engine.ortvalue(shape, np.float32) for _ in range(2)]
        self._parity = 0
        self._bindings: dict[tuple[str, int, int], _Binding] = {}

    def _binding(self, graph: str, shape: tuple[int, int]) -> _Binding:
        key = (graph, shape[1], self._parity)
        if key not in self._bindings:
            memory_out = self._buffers[1 - self._parity] if graph != READ else None
            binding = _Binding(self._engine, graph, self._buffers[self._parity], memory_out,
                               shape)
            if graph == READ:  # generation reads ever longer contexts: nothing to reuse
                return binding
            self._bindings[key] = binding
        return self._bindings[key]

    def load(self, memory: np.ndarray) -> None:
        self._buffers[self._parity].update_inplace(
            np.ascontiguousarray(memory, dtype=np.float32))

    def memory(self) -> np.ndarray:
        return self._buffers[self._parity].numpy().copy()

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             logits: bool = True) -> np.ndarray | None:
        graph = WRITE if not logits and WRITE in self._engine.sessions else STEP
        result = self._binding(graph, input_ids.shape).run(input_ids, attention_mask, logits)
        self._parity ^= 1
        return result

    def read(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if READ not in self._engine.sessions:
            raise BackendError(NO_READ_GRAPH)
        return self._binding(READ, input_ids.shape).run(input_ids, attention_mask, True)

    def close(self) -> None:
        self._bindings.clear()
        self._buffers.clear()
        super().close()
