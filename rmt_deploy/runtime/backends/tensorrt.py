"""TensorRT backend: serialized plans run with name-based I/O on a state's own CUDA
stream.

A state owns, for its whole life, one execution context per plan, the two device buffers
its memory swaps between each segment (never aliased, so memory never crosses to the
host between segments), pinned staging for the token ids and logits, and, with CUDA
graphs, one captured graph per (graph, shape, buffer parity), replayed after the first
step. ``close()`` frees all of it. Written against the TensorRT 10.x / 11.x Python API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rmt_deploy.contract import (
    ATTENTION_MASK,
    DECODE,
    INPUT_IDS,
    LOGITS,
    MEMORY_IN,
    MEMORY_OUT,
    PREFILL,
    STEP,
    WRITE,
    past_names,
    present_names,
)
from rmt_deploy.errors import BackendError
from rmt_deploy.manifest import Manifest
from rmt_deploy.runtime.backends import _cuda
from rmt_deploy.runtime.backends.base import NO_GENERATION, EngineState, StepEngine, check_io
from rmt_deploy.runtime.backends.tensorrt_plan import check_compatible
from rmt_deploy.runtime.options import RuntimeOptions


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


class TensorRTEngine(StepEngine):
    name = "tensorrt"

    def __init__(self, manifest: Manifest, options: RuntimeOptions | None = None) -> None:
        trt = import_tensorrt()
        options = options or RuntimeOptions(backend="tensorrt")
        self.trt = trt
        self.config = manifest.config
        self.cuda_graphs = options.cuda_graphs
        gpu, capability = _cuda.device_name_and_capability()
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self.plans: dict[str, _Plan] = {}
        for graph in (STEP, WRITE, PREFILL, DECODE):
            record = manifest.engines.get(graph)
            if record is None:
                continue
            check_compatible(record, trt.__version__, gpu, capability)
            engine = runtime.deserialize_cuda_engine(manifest.read_bytes(record["file"]))
            if engine is None:
                raise BackendError(f"{record['file']}: TensorRT could not deserialize it; "
                                   "rebuild it with rmt-export --engine")
            self.plans[graph] = self._plan(engine, manifest, record)
        if STEP not in self.plans:
            raise BackendError("this export has no TensorRT plan; build one with "
                               "rmt-export --engine")
        self.precision = manifest.engines[STEP].get("precision", "fp16")
        self.graphs = frozenset(self.plans)
        # positions a decode step may attend to: its plan's profile says how many
        self.max_total = (manifest.engines[DECODE]["profile"][ATTENTION_MASK][2][1]
                          if DECODE in self.plans else 0)

    def _plan(self, engine: Any, manifest: Manifest, record: dict[str, Any]) -> _Plan:
        trt = self.trt
        spec = next(s for s in manifest.graphs.values() if s.file == record["source_graph"])
        tensors = {"input": {}, "output": {}}
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            kind = "output" if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT else "input"
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name
            shape = tuple(None if d < 0 else d for d in engine.get_tensor_shape(name))
            tensors[kind][name] = (dtype, shape)
        check_io(record["file"], spec.inputs, tensors["input"], "input")
        check_io(record["file"], spec.outputs, tensors["output"], "output")
        return _Plan(engine, {name: np.dtype(dtype) for name, (dtype, _) in
                              tensors["output"].items()})

    def new_state(self, memory: np.ndarray) -> _State:
        state = _State(self, len(memory))
        state.load(memory)
        return state


class _Context:
    """An execution context, released on ``free()``."""

    def __init__(self, engine: Any) -> None:
        self.context = engine.create_execution_context()

    def free(self) -> None:
        self.context = None


class _State(EngineState):
    def __init__(self, engine: TensorRTEngine, batch: int) -> None:
        allocations = _cuda.Allocations()
        super().__init__(batch, free=allocations)
        self._engine, self._allocations = engine, allocations
        config = engine.config
        self._memory_shape = (batch, config.num_mem_tokens, config.hidden_size)
        nbytes = int(np.prod(self._memory_shape)) * 4
        self._stream = allocations.add(_cuda.Stream())
        self._buffers = [allocations.add(_cuda.DeviceBuffer(nbytes)) for _ in range(2)]
        self._parity = 0
        self._contexts = {name: allocations.add(_Context(plan.engine)).context
                          for name, plan in engine.plans.items()}
        self._staging: dict[tuple, tuple[np.ndarray, _cuda.DeviceBuffer]] = {}
        self._graphs: dict[tuple, _cuda.CapturedGraph] = {}
        self._caches: list[list[_cuda.DeviceBuffer]] = []  # two KV sets, made on first use

    def load(self, memory: np.ndarray) -> None:
        host = np.ascontiguousarray(memory, dtype=np.float32)
        self._buffers[self._parity].upload(host, self._stream)
        self._stream.synchronize()

    def memory(self) -> np.ndarray:
        host = np.empty(self._memory_shape, np.float32)
        self._buffers[self._parity].download(host, self._stream)
        self._stream.synchronize()
        return host

    def _stage(self, key: tuple, shape: tuple[int, ...], dtype: Any
               ) -> tuple[np.ndarray, _cuda.DeviceBuffer]:
        """A pinned host array and a device buffer of one tensor shape, kept for reuse."""
        if key not in self._staging:
            host = self._allocations.add(_cuda.PinnedArray(shape, dtype))
            device = self._allocations.add(_cuda.DeviceBuffer(host.array.nbytes))
            self._staging[key] = (host.array, device)
        return self._staging[key]

    def _run(self, graph: str, input_ids: np.ndarray, attention_mask: np.ndarray,
             logits: bool) -> np.ndarray | None:
        context, plan = self._contexts[graph], self._engine.plans[graph]
        shape = tuple(input_ids.shape)
        ids_host, ids_dev = self._stage((INPUT_IDS, shape), shape, np.int64)
        mask_host, mask_dev = self._stage((ATTENTION_MASK, shape), shape, np.int64)
        ids_host[...] = input_ids
        mask_host[...] = attention_mask
        ids_dev.upload(ids_host, self._stream)
        mask_dev.upload(mask_host, self._stream)
        context.set_input_shape(INPUT_IDS, shape)
        context.set_input_shape(ATTENTION_MASK, shape)
        context.set_input_shape(MEMORY_IN, self._memory_shape)
        context.set_tensor_address(INPUT_IDS, ids_dev.ptr)
        context.set_tensor_address(ATTENTION_MASK, mask_dev.ptr)
        context.set_tensor_address(MEMORY_IN, self._buffers[self._parity].ptr)
        if graph != PREFILL:
            context.set_tensor_address(MEMORY_OUT, self._buffers[1 - self._parity].ptr)
        else:
            for name, buffer in zip(present_names(self._engine.config), self._kv_sets()[0],
                                    strict=True):
                context.set_tensor_address(name, buffer.ptr)
        if LOGITS in plan.outputs:
            logits_shape = tuple(context.get_tensor_shape(LOGITS))
            logits_host, logits_dev = self._stage((graph, LOGITS, logits_shape), logits_shape,
                                                  plan.outputs[LOGITS])
            context.set_tensor_address(LOGITS, logits_dev.ptr)
        self._execute((graph, shape, self._parity), context)
        if logits and LOGITS in plan.outputs:
            logits_dev.download(logits_host, self._stream)
            self._stream.synchronize()
            return np.array(logits_host, dtype=np.float32)
        self._stream.synchronize()
        return None

    def _execute(self, key: tuple, context: Any) -> None:
        """Run the enqueued step; with CUDA graphs, capture it the first time a (graph,
        shape, parity) runs and replay it after."""
        if not self._engine.cuda_graphs:
            if not context.execute_async_v3(self._stream.ptr):
                raise BackendError("TensorRT failed to run the step (see its log above)")
            return
        if key in self._graphs:
            self._graphs[key].replay(self._stream)
            return
        context.execute_async_v3(self._stream.ptr)  # lazy initialisation, outside capture
        self._graphs[key] = self._allocations.add(_cuda.CapturedGraph(
            self._stream, lambda stream: context.execute_async_v3(stream.ptr)))

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             logits: bool = True) -> np.ndarray | None:
        graph = WRITE if not logits and WRITE in self._contexts else STEP
        result = self._run(graph, input_ids, attention_mask, logits)
        self._parity ^= 1
        return result

    def _kv_sets(self) -> list[list[_cuda.DeviceBuffer]]:
        """Two sets of key/value buffers of the largest cache the decode plan takes: a
        step reads one set and writes the other."""
        if not self._caches:
            config = self._engine.config
            nbytes = (self.batch * config.cache_heads * self._engine.max_total
                      * config.head_dim * 4)
            self._caches = [[self._allocations.add(_cuda.DeviceBuffer(nbytes))
                             for _ in present_names(config)] for _ in range(2)]
        return self._caches

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                capacity: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
        """The cache is ``(set, positions)``: which buffer set holds it, and how long."""
        if not self._engine.generates:
            raise BackendError(NO_GENERATION)
        logits = self._run(PREFILL, input_ids, attention_mask, True)
        return logits, (0, self._engine.config.num_mem_tokens + input_ids.shape[1])

    def decode(self, cache: tuple[int, int], input_ids: np.ndarray,
               attention_mask: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        engine, config = self._engine, self._engine.config
        which, past = cache
        if attention_mask.shape[1] > engine.max_total:
            raise BackendError(f"the decode plan takes at most {engine.max_total} positions; "
                               "rebuild it with a larger --max-new-tokens")
        context, plan = self._contexts[DECODE], engine.plans[DECODE]
        ids_host, ids_dev = self._stage((DECODE, INPUT_IDS), (self.batch, 1), np.int64)
        mask_host, mask_dev = self._stage((DECODE, ATTENTION_MASK),
                                          (self.batch * engine.max_total,), np.int64)
        logits_host, logits_dev = self._stage((DECODE, LOGITS), (self.batch, config.vocab_size),
                                              plan.outputs[LOGITS])
        ids_host[...] = input_ids
        flat = attention_mask.reshape(-1)
        mask_host[: flat.size] = flat
        ids_dev.upload(ids_host, self._stream)
        mask_dev.upload(mask_host, self._stream)
        context.set_input_shape(INPUT_IDS, (self.batch, 1))
        context.set_input_shape(ATTENTION_MASK, attention_mask.shape)
        context.set_tensor_address(INPUT_IDS, ids_dev.ptr)
        context.set_tensor_address(ATTENTION_MASK, mask_dev.ptr)
        context.set_tensor_address(LOGITS, logits_dev.ptr)
        sets = self._kv_sets()
        shape = (self.batch, config.cache_heads, past, config.head_dim)
        for name, buffer in zip(past_names(config), sets[which], strict=True):
            context.set_input_shape(name, shape)
            context.set_tensor_address(name, buffer.ptr)
        for name, buffer in zip(present_names(config), sets[1 - which], strict=True):
            context.set_tensor_address(name, buffer.ptr)
        if not context.execute_async_v3(self._stream.ptr):
            raise BackendError("TensorRT failed to run the decode step (see its log above)")
        logits_dev.download(logits_host, self._stream)
        self._stream.synchronize()
        return np.array(logits_host, dtype=np.float32), (1 - which, past + 1)
