"""The few CUDA runtime calls the TensorRT backend needs, through NVIDIA's cuda-python:
a stream, device buffers, pinned host arrays, async copies and graph capture. Everything
allocated here has a ``free()``; ``Allocations`` frees a group of them at once."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np

from rmt_deploy.errors import BackendError


def cudart() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise BackendError("the TensorRT backend needs cuda-python: pip install "
                               "cuda-python") from None
    return runtime


def call(result: Any) -> Any:
    """Unwrap cuda-python's ``(error, value...)`` tuples; an error is a BackendError."""
    rt = cudart()
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != rt.cudaError_t.cudaSuccess:
        _, name = rt.cudaGetErrorName(error)
        name = name.decode() if isinstance(name, bytes) else name
        raise BackendError(f"CUDA call failed: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def device_name_and_capability(device: int = 0) -> tuple[str, str]:
    rt = cudart()
    props = call(rt.cudaGetDeviceProperties(device))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00"), f"{props.major}.{props.minor}"


class Stream:
    def __init__(self) -> None:
        self.handle = call(cudart().cudaStreamCreate())

    @property
    def ptr(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        call(cudart().cudaStreamSynchronize(self.handle))

    def free(self) -> None:
        call(cudart().cudaStreamDestroy(self.handle))


class DeviceBuffer:
    """Raw device memory of ``nbytes``."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.ptr = int(call(cudart().cudaMalloc(max(nbytes, 1))))

    def upload(self, host: np.ndarray, stream: Stream) -> None:
        rt = cudart()
        call(rt.cudaMemcpyAsync(self.ptr, host.ctypes.data, host.nbytes,
                                rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle))

    def download(self, host: np.ndarray, stream: Stream) -> None:
        rt = cudart()
        call(rt.cudaMemcpyAsync(host.ctypes.data, self.ptr, host.nbytes,
                                rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle))

    def free(self) -> None:
        call(cudart().cudaFree(self.ptr))


class PinnedArray:
    """A numpy array (``.array``) in page-locked host memory: fast, truly async copies."""

    def __init__(self, shape: tuple[int, ...], dtype: Any) -> None:
        count = int(np.prod(shape))
        nbytes = max(count * np.dtype(dtype).itemsize, 1)
        self.ptr = int(call(cudart().cudaMallocHost(nbytes)))
        raw = (ctypes.c_byte * nbytes).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def free(self) -> None:
        self.array = None
        call(cudart().cudaFreeHost(self.ptr))


class CapturedGraph:
    """A CUDA graph of the work ``launch(stream)`` enqueues, replayed with ``replay``."""

    def __init__(self, stream: Stream, launch: Callable[[Stream], Any]) -> None:
        rt = cudart()
        call(rt.cudaStreamBeginCapture(
            stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        launch(stream)
        graph = call(rt.cudaStreamEndCapture(stream.handle))
        self._exec = call(rt.cudaGraphInstantiate(graph, 0))
        call(rt.cudaGraphDestroy(graph))

    def replay(self, stream: Stream) -> None:
        call(cudart().cudaGraphLaunch(self._exec, stream.handle))

    def free(self) -> None:
        call(cudart().cudaGraphExecDestroy(self._exec))


class Allocations:
    """Things with ``free()``, freed together, last allocated first. Calling the object
    frees them; it holds no reference to their owner, so it can be its finalizer."""

    def __init__(self) -> None:
        self._items: list[Any] = []

    def add(self, item: Any) -> Any:
        self._items.append(item)
        return item

    def __call__(self) -> None:
        while self._items:
            self._items.pop().free()
