"""ONNX Runtime backend: CPU, or CUDA with IOBinding where onnxruntime-gpu is installed.

Graphs are loaded from the files as the manifest was opened with them (``Manifest.
read_bytes``; large weights from their map), so one replaced meanwhile is never mixed in.
A state holds two OrtValues per state pair swapped each step, and one IOBinding per
(graph, width, parity) bound once to its own input and output OrtValues, so a step only
copies the token ids in and, where they are read, the logits out."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Mapping
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
    sizes_of,
    state_pairs,
    step_graph,
    variant,
)
from rmt_deploy.errors import BackendError
from rmt_deploy.manifest import GraphSpec, Manifest
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

_TYPES = {"tensor(int64)": "int64", "tensor(float)": "float32", "tensor(float16)": "float16"}
#: Weights files from this size on are mapped once and shared by every session.
SHARED_WEIGHTS_BYTES = 256 << 20


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
        # CUDA in true FP32: TF32 matmuls (the default on Ampere and newer) would add error
        providers = ([("CUDAExecutionProvider", {"use_tf32": "0"})] if device == "cuda"
                     else []) + ["CPUExecutionProvider"]
        self.fusions = bool(options.fusions)
        if self.fusions and (device != "cpu" or not self.config.is_encoder):
            raise BackendError("ONNX Runtime's transformer fusions apply to encoder graphs on "
                               "the CPU; drop them here")
        self._threads = options.threads
        self._weights = _mapped_weights(manifest, ort)  # kept alive: the sessions use them
        if self._weights:
            _share_arena(ort)
        self._manifest, self._providers = manifest, providers
        self._keys = precision_graphs(manifest, options.precision)
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.graphs = frozenset(self._keys)
        self.session(STEP)  # loaded at once: a damaged export fails when it is opened

    def session(self, graph: str) -> Any:
        """The session of one graph, loaded (and checked against the manifest) when first
        used: a run loads only the graphs it needs."""
        with self._lock:
            if graph not in self._sessions:
                self._sessions[graph] = self._load(graph)
            return self._sessions[graph]

    def _session_options(self) -> Any:
        """Options for one session (each gets its own: the graph's weights go in them)."""
        ort = self._ort
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self._threads:
            session_options.intra_op_num_threads = self._threads
        if self._weights:  # one copy for every session, in place of a prepacked one each
            session_options.add_session_config_entry("session.disable_prepacking", "1")
            # and one arena for their activations (_share_arena)
            session_options.add_session_config_entry("session.use_env_allocators", "1")
            session_options.enable_mem_pattern = False
            for name, value in self._weights.items():
                session_options.add_initializer(name, value)
        return session_options

    def _load(self, graph: str) -> Any:
        """A graph's session, from the files as the manifest was opened with them; with
        large weights (mapped) the graph is read by path, and checked to be the file
        opened after it was read."""
        manifest = self._manifest
        spec = manifest.graphs[self._keys[graph]]
        path = manifest.path(spec.file)
        session_options = self._session_options()
        data = [entry["file"] for entry in spec.data]
        if self.fusions:
            source = _fused(manifest, spec)
        elif self._weights:  # ORT takes no graph in memory whose weights it is not given
            source = str(path)
        else:
            source = manifest.read_bytes(spec.file)
            contents = [manifest.read_bytes(name) for name in data]
            session_options.add_external_initializers_from_files_in_memory(
                data, contents, [len(content) for content in contents])
        try:
            session = self._ort.InferenceSession(source, session_options,
                                                 providers=self._providers)
        except Exception as error:  # ORT raises its own non-exported types
            first = str(error).strip().splitlines()[0][:200]
            raise BackendError(f"{path}: ONNX Runtime cannot load it ({first}); "
                               "re-export the model") from None
        if isinstance(source, str):
            manifest.check_paths([spec.file, *data])
        for kind, declared, actual in (("input", spec.inputs, session.get_inputs()),
                                       ("output", spec.outputs, session.get_outputs())):
            check_io(str(path), declared, {a.name: (_TYPES.get(a.type, a.type),
                                                    tuple(a.shape)) for a in actual}, kind)
        return session

    def new_state(self, state: Mapping[str, np.ndarray]) -> _State:
        engine_state = _State(self, rows_of(state))
        engine_state.load(state)
        return engine_state

    def ortvalue(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self._ort.OrtValue.ortvalue_from_shape_and_type(shape, np.dtype(dtype).type,
                                                               self.device)


def _fused(manifest: Manifest, spec: GraphSpec) -> bytes:
    """The graph with ONNX Runtime's transformer fusions (attention, SkipLayerNormalization,
    bias + GELU, where they match), made in memory from the files as opened: no file is
    written."""
    try:
        import onnx
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_by_fusion
    except ImportError:
        raise BackendError("ONNX Runtime's transformer fusions need the onnx package: pip "
                           "install onnx, or drop them") from None
    path = manifest.path(spec.file)
    model = onnx.load_model_from_string(manifest.read_bytes(spec.file))
    contents = {entry["file"]: manifest.read_bytes(entry["file"]) for entry in spec.data}
    for tensor in model.graph.initializer:  # onnx.load's loading of external data
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            if info.location not in contents:
                raise BackendError(f"{path}: reads weights from {info.location}, which the "
                                   "manifest does not list for it; re-export the model")
            content, start = contents[info.location], info.offset or 0
            end = len(content) if info.length is None else start + info.length
            tensor.raw_data = content[start:end]
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it logs each fusion it did not find
    try:  # heads and width are read from the graph
        fused = optimize_by_fusion(model, "bert", 0, 0, FusionOptions("bert"))
    except Exception as error:  # its fusions assert what they expect of a graph
        raise BackendError(f"{path}: ONNX Runtime's transformer fusions fail on it "
                           f"({type(error).__name__}); drop them") from None
    finally:
        quiet.setLevel(level)
    return fused.model.SerializeToString()


@functools.cache
def _share_arena(ort: Any) -> None:
    """Register one CPU arena for the whole process (once), which sessions that ask for
    the environment's allocators share (each would otherwise keep an arena of its own)."""
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                             ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))


class _HostCache:
    """Two sets of buffers in host memory for the cache pairs of one generation, each
    holding up to ``capacity`` positions: a decode step reads one set and writes the
    other, so no memory is allocated per token."""

    def __init__(self, engine: OnnxRuntimeEngine, batch: int, capacity: int) -> None:
        self._ort, self.capacity, self._batch = engine._ort, capacity, batch
        self._pairs = cache_pairs(engine.config)
        self._sets = [[np.empty(int(np.prod(concrete(p.shape, {BATCH: batch, PAST: capacity}))),
                                np.dtype(p.dtype)) for p in self._pairs] for _ in range(2)]

    def values(self, which: int, length: int) -> list[Any]:
        """Set ``which`` as OrtValues of ``length`` positions (views, no copy)."""
        if length > self.capacity:
            raise BackendError(f"the generation cache holds {self.capacity} positions, the "
                               f"step needs {length}")
        values = []
        for pair, buffer in zip(self._pairs, self._sets[which], strict=True):
            shape = concrete(pair.shape, {BATCH: self._batch, PAST: length})
            values.append(self._ort.OrtValue.ortvalue_from_numpy(
                buffer[: int(np.prod(shape))].reshape(shape)))
        return values


def shares_weights(manifest: Manifest) -> bool:
    """Whether the export's weights file is large enough to be mapped once and shared by
    every session (``SHARED_WEIGHTS_BYTES``)."""
    return bool(manifest.weights) and manifest.size(
        manifest.weights["file"]) >= SHARED_WEIGHTS_BYTES


def _mapped_weights(manifest: Manifest, ort: Any) -> dict[str, Any]:
    """The export's weights file mapped once, as OrtValues every session shares, where it
    is large (``SHARED_WEIGHTS_BYTES``): then memory holds the weights once, whatever the
    number of graphs. Smaller models keep ONNX Runtime's own loading, which prepacks each
    session's matmul weights (faster, one copy per session)."""
    if not shares_weights(manifest):
        return {}
    path = manifest.path(manifest.weights["file"])
    mapped = manifest.mapped(manifest.weights["file"])  # the file opened, copy-on-write
    values = {}
    for name, entry in manifest.weights["tensors"].items():
        try:
            array = np.ndarray(tuple(entry["shape"]), dtype=np.dtype(entry["dtype"]),
                               buffer=mapped, offset=entry["offset"])
        except (TypeError, ValueError) as error:
            raise BackendError(f"{path}: tensor {name} does not fit the weights file as its "
                               f"index says ({error}); re-export the model") from None
        values[name] = ort.OrtValue.ortvalue_from_numpy(array)
    return values


class _Binding:
    """One step-like graph's IOBinding (step, write or prefill) at one input width and
    state parity: the state it reads bound to ``reads``, the state it writes to
    ``writes``; a prefill binds its cache outputs at each run (``_State.prefill``)."""

    def __init__(self, engine: OnnxRuntimeEngine, graph: str, reads: dict[str, Any],
                 writes: dict[str, Any], shape: tuple[int, int]) -> None:
        contract = variant(engine.config, graph)
        self.session = engine.session(graph)
        self.binding = self.session.io_binding()
        self.ids, self.mask = engine.ortvalue(shape, np.int64), engine.ortvalue(shape, np.int64)
        self.binding.bind_ortvalue_input(INPUT_IDS, self.ids)
        self.binding.bind_ortvalue_input(ATTENTION_MASK, self.mask)
        for pair in contract.reads:
            self.binding.bind_ortvalue_input(pair.name_in, reads[pair.name_in])
        for pair in contract.writes:
            self.binding.bind_ortvalue_output(pair.name_out, writes[pair.name_in])
        self.logits = None
        if any(t.name == LOGITS for t in contract.outputs):
            logits = contract.tensor(LOGITS)
            self.logits = engine.ortvalue(concrete(logits.shape, sizes_of(
                contract, {INPUT_IDS: tuple(shape)})), np.dtype(logits.dtype))
            self.binding.bind_ortvalue_output(LOGITS, self.logits)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, logits: bool
            ) -> np.ndarray | None:
        self.ids.update_inplace(np.ascontiguousarray(input_ids, dtype=np.int64))
        self.mask.update_inplace(np.ascontiguousarray(attention_mask, dtype=np.int64))
        self.session.run_with_iobinding(self.binding)
        return self.logits.numpy().copy() if logits and self.logits is not None else None


class _State(EngineState):
    def __init__(self, engine: OnnxRuntimeEngine, batch: int) -> None:
        super().__init__(batch)
        self._engine = engine
        self._pairs = state_pairs(engine.config)
        self._buffers = [{p.name_in: engine.ortvalue((batch, *p.row_shape), np.dtype(p.dtype))
                          for p in self._pairs} for _ in range(2)]
        self._parity = 0
        self._bindings: dict[tuple[str, int, int], _Binding] = {}

    def _binding(self, graph: str, shape: tuple[int, int]) -> _Binding:
        key = (graph, shape[1], self._parity)
        if key not in self._bindings:
            self._bindings[key] = _Binding(self._engine, graph, self._buffers[self._parity],
                                           self._buffers[1 - self._parity], shape)
        return self._bindings[key]

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        for pair in self._pairs:
            self._buffers[self._parity][pair.name_in].update_inplace(
                np.ascontiguousarray(state[pair.name_in], dtype=pair.dtype))

    def state(self) -> State:
        return {name: value.numpy().copy()
                for name, value in self._buffers[self._parity].items()}

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             logits: bool = True) -> np.ndarray | None:
        graph = step_graph(self._engine.graphs, logits)
        result = self._binding(graph, input_ids.shape).run(input_ids, attention_mask, logits)
        self._parity ^= 1
        return result

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                capacity: int | None = None) -> tuple[np.ndarray, Any]:
        engine = self._engine
        if not engine.generates:
            raise BackendError(NO_GENERATION)
        binding = self._binding(PREFILL, input_ids.shape)
        length = context_slots(engine.config) + input_ids.shape[1]
        names = [pair.name_out for pair in cache_pairs(engine.config)]
        if engine.device != "cpu" or capacity is None:  # ORT allocates each step's cache
            for name in names:
                binding.binding.bind_output(name, engine.device)
            logits = binding.run(input_ids, attention_mask, True)
            return logits, binding.binding.get_outputs()[1:]
        cache = _HostCache(engine, len(input_ids), max(capacity, length))
        for name, value in zip(names, cache.values(0, length), strict=True):
            binding.binding.bind_ortvalue_output(name, value)
        return binding.run(input_ids, attention_mask, True), (cache, 0, length)

    def decode(self, cache: Any, input_ids: np.ndarray, attention_mask: np.ndarray
               ) -> tuple[np.ndarray, Any]:
        """The cache stays in the backend's buffers: a host cache's two sets take turns
        as a step's input and output; otherwise each step's outputs, allocated by ONNX
        Runtime, are bound as the next step's inputs. Only the logits come to the host."""
        engine, config = self._engine, self._engine.config
        session = engine.session(DECODE)
        binding = session.io_binding()
        binding.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input(ATTENTION_MASK,
                               np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_output(LOGITS, engine.device)
        for pair in decode_reads(config):
            binding.bind_ortvalue_input(pair.name_in, self._buffers[self._parity][pair.name_in])
        hosted = isinstance(cache, tuple)
        if hosted:
            host, which, length = cache
            past, present = host.values(which, length), host.values(1 - which, length + 1)
        else:
            past, present = cache, None
        for index, pair in enumerate(cache_pairs(config)):
            binding.bind_ortvalue_input(pair.name_in, past[index])
            if present is None:
                binding.bind_output(pair.name_out, engine.device)
            else:
                binding.bind_ortvalue_output(pair.name_out, present[index])
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        grown = (host, 1 - which, length + 1) if hosted else outputs[1:]
        return outputs[0].numpy(), grown

    def close(self) -> None:
        self._bindings.clear()
        self._buffers.clear()
        super().close()
