"""A stand-in for TensorRT's runtime and the CUDA runtime (cuda-python), for CPU tests of
the TensorRT backend's loop: device memory is host memory at real addresses, copies
are memmoves, and an execution context runs the plan's ONNX graph with ONNX Runtime on
whatever its tensor addresses hold. CUDA graph capture records each launch with the
addresses it had, as a real graph fixes its kernels' arguments, and replays them.
Every allocation is recorded with its free, so tests can check lifetimes.

The build side stands in at Polygraphy's boundary (:class:`FakeBuilder`): its loaders
``NetworkFromOnnxPath``, ``CreateConfig`` and ``EngineBytesFromNetwork`` record what they
are given and "build" a fake plan of the parsed graph; Polygraphy's own ``Profile``,
``PostprocessNetwork`` and ``SaveBytes`` run for real. The enums the build reads carry
TensorRT's own values for the version asked for."""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import itertools
import sys
import types
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

PLAN_PREFIX = b"fake-plan:"


def plan_bytes(onnx_path: Path) -> bytes:
    """The content of a fake plan that runs ``onnx_path``."""
    return PLAN_PREFIX + str(onnx_path).encode()


class FakeCuda:
    """``cuda.bindings.runtime`` as the backend uses it."""

    class cudaError_t:  # noqa: N801 - cuda-python's names
        cudaSuccess = 0

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaStreamCaptureMode:  # noqa: N801
        cudaStreamCaptureModeThreadLocal = 0

    def __init__(self) -> None:
        self.live: dict[int, tuple[str, object]] = {}  # address/handle -> (kind, keep-alive)
        self.counts: Counter[str] = Counter()
        self.capturing: dict[int, list] = {}  # stream -> launches recorded
        self._handles = itertools.count(1)

    # memory
    def _allocate(self, kind: str, nbytes: int) -> int:
        buffer = ctypes.create_string_buffer(nbytes)
        address = ctypes.addressof(buffer)
        self.live[address] = (kind, buffer)
        self.counts[kind] += 1
        return address

    def _free(self, kind: str, address: int) -> tuple[int]:
        assert self.live.pop(address)[0] == kind, f"{kind} of something else"
        self.counts[kind + " freed"] += 1
        return (0,)

    def cudaMalloc(self, nbytes):  # noqa: N802
        return 0, self._allocate("device", nbytes)

    def cudaFree(self, address):  # noqa: N802
        return self._free("device", address)

    def cudaMallocHost(self, nbytes):  # noqa: N802
        return 0, self._allocate("pinned", nbytes)

    def cudaFreeHost(self, address):  # noqa: N802
        return self._free("pinned", address)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):  # noqa: N802
        assert stream not in self.capturing, "copies are not captured"
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    # streams and graphs
    def _handle(self, kind: str) -> int:
        handle = next(self._handles)
        self.live[handle] = (kind, None)
        self.counts[kind] += 1
        return handle

    def cudaStreamCreate(self):  # noqa: N802
        return 0, self._handle("stream")

    def cudaStreamDestroy(self, handle):  # noqa: N802
        return self._free("stream", handle)

    def cudaStreamSynchronize(self, handle):  # noqa: N802
        return (0,)

    def cudaStreamBeginCapture(self, stream, mode):  # noqa: N802
        self.capturing[stream] = []
        return (0,)

    def cudaStreamEndCapture(self, stream):  # noqa: N802
        launches = self.capturing.pop(stream)
        handle = self._handle("graph")
        self.live[handle] = ("graph", launches)
        return 0, handle

    def cudaGraphInstantiate(self, graph, flags):  # noqa: N802
        handle = self._handle("graph exec")
        self.live[handle] = ("graph exec", self.live[graph][1])
        return 0, handle

    def cudaGraphDestroy(self, graph):  # noqa: N802
        return self._free("graph", graph)

    def cudaGraphLaunch(self, handle, stream):  # noqa: N802
        self.counts["replays"] += 1
        for launch in self.live[handle][1]:
            launch()
        return (0,)

    def cudaGraphExecDestroy(self, handle):  # noqa: N802
        return self._free("graph exec", handle)

    def cudaGetDeviceProperties(self, device):  # noqa: N802
        return 0, types.SimpleNamespace(name=b"Fake GPU", major=9, minor=0)

    def cudaGetErrorName(self, error):  # noqa: N802
        return 0, b"cudaErrorFake"

    def leaks(self) -> dict[str, int]:
        """What is allocated and not freed, by kind."""
        return dict(Counter(kind for kind, _ in self.live.values()))


def _array(address: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    count = int(np.prod(shape))
    raw = (ctypes.c_byte * (count * np.dtype(dtype).itemsize)).from_address(address)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


def fake_tensorrt(cuda: FakeCuda, version: str = "10.13.0") -> types.ModuleType:
    """A ``tensorrt`` module whose runtime runs fake plans (see :func:`plan_bytes`). An
    execution context's calls that report success as a bool (``set_input_shape``,
    ``set_tensor_address``, ``execute_async_v3``) return False while their name is in
    ``trt.failing``, as TensorRT does for a shape outside the profile or a failed launch;
    ``execute_async_v3`` also returns False, as TensorRT does, when an input or output of
    the plan has no address (or an input no shape), recording their names in
    ``trt.unset``."""
    import onnxruntime as ort

    trt = types.ModuleType("tensorrt")
    trt.failing = set()
    trt.unset = []
    trt.__version__ = version
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # found, as if installed
    dtypes = {"tensor(int64)": np.int64, "tensor(float)": np.float32,
              "tensor(float16)": np.float16}

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class TensorIOMode:
        INPUT, OUTPUT = "input", "output"

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}
            cuda.counts["context"] += 1

        def set_input_shape(self, name, shape):
            if "set_input_shape" in trt.failing:
                return False
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return self.engine.output_shape(name, self.shapes)

        def set_tensor_address(self, name, address):
            if "set_tensor_address" in trt.failing:
                return False
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream):
            if "execute_async_v3" in trt.failing:
                return False
            unset = [name for name in self.engine.names if name not in self.addresses
                     or (name in self.engine.inputs and name not in self.shapes)]
            if unset:  # TensorRT logs "Address is not set for input tensor ..." and fails
                trt.unset.append(unset)
                return False
            shapes, addresses = dict(self.shapes), dict(self.addresses)  # fixed at launch

            def launch():
                self.engine.run(shapes, addresses)

            if stream in cuda.capturing:
                cuda.capturing[stream].append(launch)
            else:
                launch()
            return True

    class Engine:
        def __init__(self, onnx_path: str):
            self.session = ort.InferenceSession(onnx_path)
            self.inputs = {i.name: i for i in self.session.get_inputs()}
            self.outputs = {o.name: o for o in self.session.get_outputs()}
            self.names = [*self.inputs, *self.outputs]
            self.num_io_tensors = len(self.names)

        def get_tensor_name(self, index):
            return self.names[index]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return (self.inputs.get(name) or self.outputs[name]).type

        def get_tensor_shape(self, name):
            shape = (self.inputs.get(name) or self.outputs[name]).shape
            return tuple(d if isinstance(d, int) else -1 for d in shape)

        def output_shape(self, name, input_shapes):
            sizes = {}
            for tensor_name, tensor in self.inputs.items():
                for dim, size in zip(tensor.shape, input_shapes[tensor_name], strict=True):
                    if isinstance(dim, str):
                        sizes[dim] = size
            return tuple(d if isinstance(d, int) else sizes[d] for d in self.outputs[name].shape)

        def run(self, shapes, addresses):
            feed = {name: _array(addresses[name], shapes[name], dtypes[i.type]).copy()
                    for name, i in self.inputs.items()}
            results = self.session.run(list(self.outputs), feed)
            for name, value in zip(self.outputs, results, strict=True):
                target = _array(addresses[name], value.shape, value.dtype)
                target[...] = value

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            assert data.startswith(PLAN_PREFIX), "not a fake plan"
            return Engine(data[len(PLAN_PREFIX):].decode())

    trt.Logger, trt.TensorIOMode, trt.Runtime = Logger, TensorIOMode, Runtime
    trt.nptype = lambda dtype: dtypes[dtype]
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0, "DLA_MANAGED_SRAM": 1})
    # NvInfer.h: 10.x has EXPLICIT_BATCH = 0 (ignored) and STRONGLY_TYPED = 1; 11.x keeps
    # only STRONGLY_TYPED = 0 (deprecated: every network is strongly typed).
    flags = ({"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if int(version.split(".")[0]) < 11
             else {"STRONGLY_TYPED": 0})
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", flags)
    return trt


class FakeNetwork:
    """What NetworkFromOnnxPath returns the network of: the graph it parsed, its flags."""

    def __init__(self, trt: types.ModuleType, onnx_path: str, strongly_typed: bool) -> None:
        self.onnx_path = onnx_path
        self._strongly_typed = strongly_typed or int(trt.__version__.split(".")[0]) >= 11
        self._flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)

    def get_flag(self, flag) -> bool:
        return self._strongly_typed if flag == self._flag else False


class FakeBuilder:
    """Polygraphy's TensorRT loaders, recorded: ``networks``, ``configs`` and ``builds``
    hold the keyword arguments each was given. A build makes the fake plan of
    ``plan_source(parsed ONNX path)`` (default: the graph itself; a test can point it at
    a damaged copy) and writes ``b"timing-cache"`` to the cache it is asked to save."""

    def __init__(self, trt: types.ModuleType) -> None:
        self.trt = trt
        self.networks: list[dict] = []
        self.configs: list[dict] = []
        self.builds: list[dict] = []
        self.plan_source: Callable[[str], str] = lambda path: path

    def install(self, monkeypatch) -> FakeBuilder:
        import polygraphy.backend.trt as loaders

        builder = self

        class NetworkFromOnnxPath:
            def __init__(self, path, **kwargs):
                builder.networks.append({"path": path, **kwargs})
                self.path, self.kwargs = path, kwargs

            def __call__(self):
                network = FakeNetwork(builder.trt, self.path, self.kwargs.get("strongly_typed"))
                return object(), network, object()

        class CreateConfig:
            def __init__(self, **kwargs):
                builder.configs.append(kwargs)

        class EngineBytesFromNetwork:
            def __init__(self, network, config=None, save_timing_cache=None):
                builder.builds.append({"config": config, "save_timing_cache": save_timing_cache})
                self.network, self.cache = network, save_timing_cache

            def __call__(self):
                _, network, _ = self.network()
                if self.cache:
                    Path(self.cache).write_bytes(b"timing-cache")
                return plan_bytes(Path(builder.plan_source(network.onnx_path)))

        for name, value in (("NetworkFromOnnxPath", NetworkFromOnnxPath),
                            ("CreateConfig", CreateConfig),
                            ("EngineBytesFromNetwork", EngineBytesFromNetwork)):
            monkeypatch.setattr(loaders, name, value)
        return self


def install_fake_gpu(monkeypatch, version: str = "10.13.0") -> tuple[FakeCuda, FakeBuilder]:
    """A fake CUDA device, TensorRT ``version`` and Polygraphy builder for one test."""
    from rmt_deploy.runtime.backends import _cuda

    cuda = FakeCuda()
    trt = fake_tensorrt(cuda, version)
    monkeypatch.setattr(_cuda, "cudart", lambda: cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return cuda, FakeBuilder(trt).install(monkeypatch)
