"""OpenVINO backend for CPUs: the same ONNX graph, compiled for the host CPU in the
precision of the graph it runs (FP32 for the FP32 graph: OpenVINO's own default, BF16 on
CPUs with AMX / AVX-512 BF16, would change the answers the export validated).

A state holds two tensors per state pair swapped each step and, for the step and write
graphs, an infer request per parity bound once to them, so a step only copies the token
ids in and, where they are read, the logits out."""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from rmt_deploy.contract import (
    ATTENTION_MASK,
    DECODE,
    INPUT_IDS,
    LOGITS,
    PREFILL,
    cache_pairs,
    decode_reads,
    state_pairs,
    step_graph,
    variant,
)
from rmt_deploy.errors import BackendError
from rmt_deploy.manifest import Manifest
from rmt_deploy.runtime.backends.base import (
    NO_GENERATION,
    EngineState,
    State,
    StepEngine,
    check_io,
    precision_graphs,
    rows_of,
)
from rmt_deploy.runtime.options import RuntimeOptions


def import_openvino() -> Any:
    """``openvino``, imported without its telemetry: importing it otherwise writes
    ``~/intel/`` (a client id and usage counts) into the home folder."""
    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    blocked = "openvino_telemetry" not in sys.modules
    if blocked:
        sys.modules["openvino_telemetry"] = None  # its import fails: the stub is used
    try:
        import openvino
    finally:
        if blocked:
            del sys.modules["openvino_telemetry"]
    return openvino


@functools.cache
def core() -> Any:
    """The process's one OpenVINO Core, kept for its life: the CPU plugin it loads gives
    the main thread an alternate signal stack, and freeing it (with a Core of one's own)
    left the stack registered but unmapped, so the next signal (SIGTERM, SIGINT) crashed
    the process."""
    return import_openvino().Core()


class OpenVinoEngine(StepEngine):
    name = "openvino"

    def __init__(self, manifest: Manifest, options: RuntimeOptions | None = None,
                 compute: str | None = None) -> None:
        """``compute``: what OpenVINO computes the FP32 graph in (default fp32; ``bf16``
        only when asked, as it is not what the export validated);
        ``options.precision``: which of the export's graphs to compile."""
        try:
            ov = import_openvino()
        except ImportError:
            raise BackendError("openvino is not installed: pip install openvino") from None
        options = options or RuntimeOptions()
        self._ov = ov
        self.config = manifest.config
        self.compute = compute or "fp32"
        if self.compute not in ("fp32", "bf16"):
            raise BackendError(f"the openvino backend computes fp32 or bf16, not {self.compute}")
        self.precision = options.precision if options.precision != "fp32" else self.compute
        settings: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "bf16" if self.compute == "bf16" else "f32",
            "PERFORMANCE_HINT": (options.hint or "latency").upper(),
        }
        self.hint = options.hint or "latency"
        if options.threads:
            settings["INFERENCE_NUM_THREADS"] = options.threads
        self.compiled: dict[str, Any] = {}
        for graph, key in precision_graphs(manifest, options.precision).items():
            spec = manifest.graphs[key]
            path = manifest.path(spec.file)
            try:
                model = core().read_model(str(path))
                compiled = core().compile_model(model, "CPU", settings)
            except RuntimeError as error:
                first = str(error).strip().splitlines()[0][:200]
                raise BackendError(f"{path}: OpenVINO cannot compile it ({first}); "
                                   "re-export the model") from None
            # OpenVINO reads ONNX with external weights by path only: what it read must
            # be the files the manifest was opened with
            manifest.check_paths([spec.file, *(entry["file"] for entry in spec.data)])
            for kind, declared, ports in (("input", spec.inputs, model.inputs),
                                          ("output", spec.outputs, model.outputs)):
                check_io(str(path), declared, {p.get_any_name(): _describe(p) for p in ports},
                         kind)
            self.compiled[graph] = compiled
        self.graphs = frozenset(self.compiled)

    def new_state(self, state: Mapping[str, np.ndarray]) -> _State:
        engine_state = _State(self, rows_of(state))
        engine_state.load(state)
        return engine_state


def _describe(port: Any) -> tuple[str, tuple]:
    dtype = {"i64": "int64", "f32": "float32", "f16": "float16"}.get(
        port.get_element_type().get_type_name(), port.get_element_type().get_type_name())
    shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
    return dtype, shape


class _State(EngineState):
    def __init__(self, engine: OpenVinoEngine, batch: int) -> None:
        super().__init__(batch)
        self._engine = engine
        self._pairs = state_pairs(engine.config)
        self._buffers = [{p.name_in: engine._ov.Tensor(np.zeros((batch, *p.row_shape), p.dtype))
                          for p in self._pairs} for _ in range(2)]
        self._parity = 0
        # requests are not thread-safe: each state has its own
        self._prefill = (engine.compiled[PREFILL].create_infer_request()
                         if PREFILL in engine.compiled else None)
        # step and write: a request per parity, its state tensors bound once, and
        # input tensors of its own that each step copies the token ids into (their views)
        self._stepping: dict[tuple[str, int], tuple[Any, dict[str, np.ndarray]]] = {}
        # decode steps alternate between two requests: one's outputs are the other's inputs
        self._decoders = [engine.compiled[DECODE].create_infer_request() for _ in range(2)
                          ] if DECODE in engine.compiled else []

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        for name, tensor in self._buffers[self._parity].items():
            tensor.data[...] = state[name]

    def state(self) -> State:
        return {name: np.array(tensor.data, copy=True)
                for name, tensor in self._buffers[self._parity].items()}

    def _bind(self, request: Any, graph: str) -> None:
        """Bind the state ``graph`` reads and writes to this parity's buffers."""
        contract = variant(self._engine.config, graph)
        for pair in contract.reads:
            request.set_tensor(pair.name_in, self._buffers[self._parity][pair.name_in])
        for pair in contract.writes:
            request.set_tensor(pair.name_out, self._buffers[1 - self._parity][pair.name_in])

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             logits: bool = True) -> np.ndarray | None:
        graph = step_graph(self._engine.graphs, logits)
        key = (graph, self._parity)
        if key not in self._stepping:
            request = self._engine.compiled[graph].create_infer_request()
            self._bind(request, graph)
            self._stepping[key] = request, {}
        request, inputs = self._stepping[key]
        for name, array in ((INPUT_IDS, input_ids), (ATTENTION_MASK, attention_mask)):
            view = inputs.get(name)  # the numpy view of the request's own input tensor
            if view is None or view.shape != array.shape:
                tensor = self._engine._ov.Tensor(self._engine._ov.Type.i64, array.shape)
                request.set_tensor(name, tensor)
                view = inputs[name] = tensor.data
            view[...] = array
        request.infer()
        self._parity ^= 1
        if not logits:
            return None
        return np.array(request.get_tensor(LOGITS).data, dtype=np.float32)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                capacity: int | None = None) -> tuple[np.ndarray, list[Any]]:
        if not self._engine.generates:
            raise BackendError(NO_GENERATION)
        ov, request = self._engine._ov, self._prefill
        request.set_tensor(INPUT_IDS, ov.Tensor(np.ascontiguousarray(input_ids, np.int64)))
        request.set_tensor(ATTENTION_MASK,
                           ov.Tensor(np.ascontiguousarray(attention_mask, np.int64)))
        self._bind(request, PREFILL)
        request.infer()
        cache = [request.get_tensor(pair.name_out) for pair in cache_pairs(self._engine.config)]
        return np.array(request.get_tensor(LOGITS).data, dtype=np.float32), cache

    def decode(self, cache: list[Any], input_ids: np.ndarray, attention_mask: np.ndarray
               ) -> tuple[np.ndarray, list[Any]]:
        ov, config = self._engine._ov, self._engine.config
        request = self._decoders[0]
        self._decoders.reverse()
        request.set_tensor(INPUT_IDS, ov.Tensor(np.ascontiguousarray(input_ids, np.int64)))
        request.set_tensor(ATTENTION_MASK,
                           ov.Tensor(np.ascontiguousarray(attention_mask, np.int64)))
        pairs = cache_pairs(config)
        for pair, tensor in zip(pairs, cache, strict=True):
            request.set_tensor(pair.name_in, tensor)
        for pair in decode_reads(config):
            request.set_tensor(pair.name_in, self._buffers[self._parity][pair.name_in])
        request.infer()
        cache = [request.get_tensor(pair.name_out) for pair in pairs]
        return np.array(request.get_tensor(LOGITS).data, dtype=np.float32), cache

    def close(self) -> None:
        self._prefill = None
        self._stepping.clear()
        self._decoders.clear()
        self._buffers.clear()
        super().close()
