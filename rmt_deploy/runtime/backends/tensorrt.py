"""TensorRT backend: serialized plans run with name-based I/O on a state's own CUDA
stream.

A state owns, for its whole life, one execution context per plan, the two device buffers
per state pair that it swaps between each segment (never aliased, so the state never
crosses to the host between segments), pinned staging for the token ids and logits,
and, with CUDA graphs, one captured graph per (graph, shape, buffer parity), replayed
after the first step. ``close()`` frees all of it. Every TensorRT call that reports
failure (shapes, addresses, launches) is checked. Written against the TensorRT 10.x /
11.x Python API.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from rmt_deploy.contract import (
    ATTENTION_MASK,
    BATCH,
    DECODE,
    INPUT_IDS,
    LOGITS,
    PAST,
    PREFILL,
    STEP,
    cache_pairs,
    concrete,
    context_slots,
    decode_reads,
    state_pairs,
    step_graph,
    variant,
    variant_names,
)
from rmt_deploy.errors import BackendError
from rmt_deploy.manifest import Manifest
from rmt_deploy.runtime.backends import _cuda
from rmt_deploy.runtime.backends.base import (
    NO_GENERATION,
    EngineState,
    State,
    StepEngine,
    check_io,
    rows_of,
)
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
        for graph in variant_names(self.config):
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
        # the batch every plan's profile takes (the profile's first axis of input_ids)
        try:
            batches = [manifest.engines[graph]["profile"][INPUT_IDS] for graph in self.plans]
            self.min_batch = max(int(shapes[0][0]) for shapes in batches)
            self.max_batch = min(int(shapes[2][0]) for shapes in batches)
        except (KeyError, IndexError, TypeError, ValueError):
            raise BackendError("the manifest does not record the plans' profiles; rebuild "
                               "them with rmt-export --engine") from None
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

    def new_state(self, state: Mapping[str, np.ndarray]) -> _State:
        """Refuses a batch outside the plans' profile, naming it (the stepper splits a
        step of more rows into steps of at most ``max_batch``)."""
        rows = rows_of(state)
        if not self.min_batch <= rows <= self.max_batch:
            raise BackendError(f"a step of {rows} rows is outside the TensorRT plans' batch "
                               f"profile {self.min_batch}..{self.max_batch}; run at most "
                               f"{self.max_batch} documents at once, or rebuild the plans "
                               "with rmt-export --engine --batch MIN,OPT,MAX")
        engine_state = _State(self, rows)
        engine_state.load(state)
        return engine_state


class _Context:
    """An execution context, released on ``free()``."""

    def __init__(self, engine: Any) -> None:
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError("TensorRT could not create an execution context (out of GPU "
                               "memory?); free the GPU or use a smaller batch")

    def free(self) -> None:
        self.context = None


def _set_shape(context: Any, name: str, shape: tuple[int, ...]) -> None:
    """``context.set_input_shape``, refused with the reason where TensorRT refuses it."""
    if not context.set_input_shape(name, tuple(shape)):
        raise BackendError(f"TensorRT refused {name} of shape {tuple(shape)}: outside the "
                           "plan's profile; rebuild it with rmt-export --engine and a "
                           "profile (--batch, --max-new-tokens) that covers it")


def _set_address(context: Any, name: str, address: int) -> None:
    if not context.set_tensor_address(name, address):
        raise BackendError(f"TensorRT refused the address of {name} (see its log above)")


def _launch(context: Any, stream: int, what: str = "the step") -> None:
    if not context.execute_async_v3(stream):
        raise BackendError(f"TensorRT failed to run {what} (see its log above)")


class _State(EngineState):
    def __init__(self, engine: TensorRTEngine, batch: int) -> None:
        allocations = _cuda.Allocations()
        super().__init__(batch, free=allocations)
        self._engine, self._allocations = engine, allocations
        self._pairs = state_pairs(engine.config)
        self._shapes = {p.name_in: (batch, *p.row_shape) for p in self._pairs}
        self._stream = allocations.add(_cuda.Stream())
        self._buffers = [{p.name_in: allocations.add(_cuda.DeviceBuffer(
            int(np.prod(self._shapes[p.name_in])) * np.dtype(p.dtype).itemsize))
            for p in self._pairs} for _ in range(2)]
        self._parity = 0
        self._contexts = {name: allocations.add(_Context(plan.engine)).context
                          for name, plan in engine.plans.items()}
        self._staging: dict[tuple, tuple[np.ndarray, _cuda.DeviceBuffer]] = {}
        self._graphs: dict[tuple, _cuda.CapturedGraph] = {}
        self._caches: list[list[_cuda.DeviceBuffer]] = []  # two cache sets, made on first use

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        for pair in self._pairs:
            host = np.ascontiguousarray(state[pair.name_in], dtype=pair.dtype)
            self._buffers[self._parity][pair.name_in].upload(host, self._stream)
        self._stream.synchronize()

    def state(self) -> State:
        hosts = {p.name_in: np.empty(self._shapes[p.name_in], p.dtype) for p in self._pairs}
        for name, host in hosts.items():
            self._buffers[self._parity][name].download(host, self._stream)
        self._stream.synchronize()
        return hosts

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
        contract = variant(self._engine.config, graph)
        _set_shape(context, INPUT_IDS, shape)
        _set_shape(context, ATTENTION_MASK, shape)
        _set_address(context, INPUT_IDS, ids_dev.ptr)
        _set_address(context, ATTENTION_MASK, mask_dev.ptr)
        for pair in contract.reads:
            _set_shape(context, pair.name_in, self._shapes[pair.name_in])
            _set_address(context, pair.name_in, self._buffers[self._parity][pair.name_in].ptr)
        for pair in contract.writes:
            _set_address(context, pair.name_out,
                         self._buffers[1 - self._parity][pair.name_in].ptr)
        if graph == PREFILL:
            for pair, buffer in zip(cache_pairs(self._engine.config), self._kv_sets()[0],
                                    strict=True):
                _set_address(context, pair.name_out, buffer.ptr)
        if LOGITS in plan.outputs:
            logits_shape = tuple(context.get_tensor_shape(LOGITS))
            logits_host, logits_dev = self._stage((graph, LOGITS, logits_shape), logits_shape,
                                                  plan.outputs[LOGITS])
            _set_address(context, LOGITS, logits_dev.ptr)
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
            _launch(context, self._stream.ptr)
            return
        if key in self._graphs:
            self._graphs[key].replay(self._stream)
            return
        _launch(context, self._stream.ptr)  # lazy initialisation, outside capture
        self._graphs[key] = self._allocations.add(_cuda.CapturedGraph(
            self._stream, lambda stream: _launch(context, stream.ptr)))

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             logits: bool = True) -> np.ndarray | None:
        graph = step_graph(self._engine.graphs, logits)
        result = self._run(graph, input_ids, attention_mask, logits)
        self._parity ^= 1
        return result

    def _kv_sets(self) -> list[list[_cuda.DeviceBuffer]]:
        """Two sets of buffers for the cache pairs, each of the largest cache the decode
        plan takes: a step reads one set and writes the other."""
        if not self._caches:
            sizes = {BATCH: self.batch, PAST: self._engine.max_total}
            self._caches = [[self._allocations.add(_cuda.DeviceBuffer(
                int(np.prod(concrete(p.shape, sizes))) * np.dtype(p.dtype).itemsize))
                for p in cache_pairs(self._engine.config)] for _ in range(2)]
        return self._caches

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                capacity: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
        """The cache is ``(set, positions)``: which buffer set holds it, and how long."""
        if not self._engine.generates:
            raise BackendError(NO_GENERATION)
        logits = self._run(PREFILL, input_ids, attention_mask, True)
        return logits, (0, context_slots(self._engine.config) + input_ids.shape[1])

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
        logits_shape = concrete(variant(config, DECODE).tensor(LOGITS).shape,
                                {BATCH: self.batch})
        logits_host, logits_dev = self._stage((DECODE, LOGITS), logits_shape,
                                              plan.outputs[LOGITS])
        ids_host[...] = input_ids
        flat = attention_mask.reshape(-1)
        mask_host[: flat.size] = flat
        ids_dev.upload(ids_host, self._stream)
        mask_dev.upload(mask_host, self._stream)
        _set_shape(context, INPUT_IDS, (self.batch, 1))
        _set_shape(context, ATTENTION_MASK, attention_mask.shape)
        _set_address(context, INPUT_IDS, ids_dev.ptr)
        _set_address(context, ATTENTION_MASK, mask_dev.ptr)
        _set_address(context, LOGITS, logits_dev.ptr)
        for pair in decode_reads(config):  # an armt's (A, z) and started, read in place
            _set_shape(context, pair.name_in, self._shapes[pair.name_in])
            _set_address(context, pair.name_in, self._buffers[self._parity][pair.name_in].ptr)
        sets = self._kv_sets()
        for pair, read, written in zip(cache_pairs(config), sets[which], sets[1 - which],
                                       strict=True):
            _set_shape(context, pair.name_in, concrete(pair.shape, {BATCH: self.batch,
                                                                    PAST: past}))
            _set_address(context, pair.name_in, read.ptr)
            _set_address(context, pair.name_out, written.ptr)
        _launch(context, self._stream.ptr, "the decode step")
        logits_dev.download(logits_host, self._stream)
        self._stream.synchronize()
        return np.array(logits_host, dtype=np.float32), (1 - which, past + 1)
