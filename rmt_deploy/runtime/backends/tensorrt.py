"""TensorRT backend: a serialized plan run with name-based I/O on its own CUDA stream.

Memory lives in two device buffers swapped every segment (never aliased), so it never
crosses to the host between segments; token ids go up through pinned host arrays; the
logits come down. Optionally each (shape, buffer parity) is captured once as a CUDA
graph and replayed. Written against the TensorRT 10.x / 11.x Python API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
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
from rmt_deploy.runtime.backends import _cuda
from rmt_deploy.runtime.backends.base import StepEngine
from rmt_deploy.runtime.backends.tensorrt_plan import check_compatible


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise BackendError(
            "TensorRT is not installed: on a machine with an NVIDIA GPU, pip install tensorrt "
            "cuda-python (or use the rmt-deploy GPU image); other backends: onnxruntime, "
            "openvino") from None
    return tensorrt


@dataclass
class _Plan:
    engine: Any  # trt.ICudaEngine, shared; execution contexts are per state
    outputs: dict[str, Any]  # output name -> numpy dtype


@dataclass
class _State:
    contexts: dict[str, Any]  # one execution context per plan (contexts are not thread-safe)
    stream: Any
    batch: int
    memory: list[Any]  # two device buffers [batch, M, H] float32, swapped each step
    parity: int = 0
    staging: dict[tuple, Any] = field(default_factory=dict)  # (name, shape) -> pinned/device
    graphs: dict[tuple, Any] = field(default_factory=dict)  # (graph, shape, parity) -> graph


class TensorRTEngine(StepEngine):
    name = "tensorrt"

    def __init__(self, manifest: Manifest, cuda_graphs: bool = False) -> None:
        trt = import_tensorrt()
        self._trt = trt
        self.config = manifest.config
        self.cuda_graphs = cuda_graphs
        gpu, capability = _cuda.device_name_and_capability()
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self._plans: dict[str, _Plan] = {}
        for graph in (STEP_GRAPH, READ_GRAPH):
            record = manifest.engines.get(graph)
            if record is None:
                continue
            check_compatible(record, trt.__version__, gpu, capability)
            engine = runtime.deserialize_cuda_engine(Path(manifest.path(record["file"]))
                                                     .read_bytes())
            if engine is None:
                raise BackendError(f"{record['file']}: TensorRT could not deserialize it; "
                                   "rebuild it with rmt-export --engine")
            outputs = {}
            for index in range(engine.num_io_tensors):
                name = engine.get_tensor_name(index)
                if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                    outputs[name] = trt.nptype(engine.get_tensor_dtype(name))
            self._plans[graph] = _Plan(engine, outputs)
        if STEP_GRAPH not in self._plans:
            raise BackendError("this export has no TensorRT plan; build one with "
                               "rmt-export --engine")
        self.precision = manifest.engines[STEP_GRAPH].get("precision", "fp16")

    def new_state(self, memory: np.ndarray) -> _State:
        stream = _cuda.Stream()
        host = np.ascontiguousarray(memory, dtype=np.float32)
        buffers = [_cuda.DeviceBuffer(host.nbytes), _cuda.DeviceBuffer(host.nbytes)]
        buffers[0].upload(host, stream)
        contexts = {name: plan.engine.create_execution_context()
                    for name, plan in self._plans.items()}
        return _State(contexts, stream, host.shape[0], buffers)

    def memory(self, state: _State) -> np.ndarray:
        m, h = self.config.num_mem_tokens, self.config.hidden_size
        host = np.empty((state.batch, m, h), np.float32)
        state.memory[state.parity].download(host, state.stream)
        state.stream.synchronize()
        return host

    def _staging(self, state: _State, name: str, shape: tuple[int, ...], dtype) -> tuple:
        key = (name, shape)
        if key not in state.staging:
            host = _cuda.pinned_array(shape, dtype)
            state.staging[key] = (host, _cuda.DeviceBuffer(host.nbytes))
        return state.staging[key]

    def _run(self, graph: str, state: _State, input_ids: np.ndarray,
             attention_mask: np.ndarray, write: bool) -> np.ndarray:
        context, plan = state.contexts[graph], self._plans[graph]
        ids_host, ids_dev = self._staging(state, INPUT_IDS, input_ids.shape, np.int64)
        mask_host, mask_dev = self._staging(state, ATTENTION_MASK, input_ids.shape, np.int64)
        ids_host[...] = input_ids
        mask_host[...] = attention_mask
        ids_dev.upload(ids_host, state.stream)
        mask_dev.upload(mask_host, state.stream)
        m, h = self.config.num_mem_tokens, self.config.hidden_size
        context.set_input_shape(INPUT_IDS, input_ids.shape)
        context.set_input_shape(ATTENTION_MASK, input_ids.shape)
        context.set_input_shape(MEMORY_IN, (state.batch, m, h))
        logits_shape = tuple(context.get_tensor_shape(LOGITS))
        logits_host, logits_dev = self._staging(state, (graph, LOGITS), logits_shape,
                                                plan.outputs[LOGITS])
        context.set_tensor_address(INPUT_IDS, ids_dev.ptr)
        context.set_tensor_address(ATTENTION_MASK, mask_dev.ptr)
        context.set_tensor_address(MEMORY_IN, state.memory[state.parity].ptr)
        context.set_tensor_address(LOGITS, logits_dev.ptr)
        if write:
            context.set_tensor_address(MEMORY_OUT, state.memory[1 - state.parity].ptr)
        self._execute(graph, state, context, input_ids.shape)
        logits_dev.download(logits_host, state.stream)
        state.stream.synchronize()
        return np.array(logits_host, dtype=np.float32)

    def _execute(self, graph: str, state: _State, context: Any, shape: tuple) -> None:
        if not self.cuda_graphs:
            if not context.execute_async_v3(state.stream.ptr):
                raise BackendError("TensorRT failed to run the step (see its log above)")
            return
        key = (graph, shape, state.parity)
        if key not in state.graphs:
            context.execute_async_v3(state.stream.ptr)  # lazy initialisation, outside capture
            state.graphs[key] = _cuda.CapturedGraph(
                state.stream, lambda stream: context.execute_async_v3(stream.ptr))
            state.stream.synchronize()  # the uncaptured run already did this step's work
            return
        state.graphs[key].replay(state.stream)

    def step(self, state: _State, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        logits = self._run(STEP_GRAPH, state, input_ids, attention_mask, write=True)
        state.parity ^= 1
        return logits

    def read(self, state: _State, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if READ_GRAPH not in self._plans:
            raise BackendError("this export has no generate.plan; rebuild with --engine")
        return self._run(READ_GRAPH, state, input_ids, attention_mask, write=False)
