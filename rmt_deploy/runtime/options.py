"""How a model is opened, as one frozen object checked in one place; each backend reads
the fields it needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

from rmt_deploy.errors import ConfigError
from rmt_deploy.manifest import PRECISIONS

EXPORT_BACKENDS = ("onnxruntime", "openvino", "tensorrt")
BACKENDS = (*EXPORT_BACKENDS, "torch")
HINTS = ("latency", "throughput")  # OpenVINO performance hints
#: How a backend left to choose is chosen: ``off`` onnxruntime with its defaults, nothing
#: measured or cached (the API's default); ``auto`` the cached choice, else measured (and
#: cached on a calm host; the CLI's default); ``again`` measured now, the cache ignored.
MEASURES = ("off", "auto", "again")


def host_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def idle_cpus() -> int:
    """CPUs of this host not already kept busy by other processes (1-minute load), at
    least 1: the default threads of the torch-side commands, which slow down several
    times when their threads outnumber the free cores."""
    try:
        busy = round(os.getloadavg()[0])
    except OSError:  # no load average
        busy = 0
    return max(1, host_cpus() - busy)


@dataclass(frozen=True)
class RuntimeOptions:
    backend: str | None = None  # None: the fastest for the model, measured (selection.py)
    precision: str = "fp32"  # which of the export's graphs: fp32, fp16 or int8
    threads: int | None = None  # CPU threads of the engine (None: the backend's default)
    cuda_graphs: bool = False  # TensorRT: capture each step shape once, replay it after
    fusions: bool | None = None  # ONNX Runtime on the CPU: its transformer fusions applied
    #                              when the session is created (None: as measured, else off)
    hint: str | None = None  # OpenVINO performance hint (None: as measured, else latency)
    measure: str = "off"  # without a backend: one of MEASURES (selection.py)

    def __post_init__(self) -> None:
        if self.backend is not None and self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}; choose one of "
                              f"{', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of "
                              f"{', '.join(PRECISIONS)}")
        if self.threads is not None:
            cpus = host_cpus()
            if isinstance(self.threads, bool) or not isinstance(self.threads, int) or \
                    not 1 <= self.threads <= cpus:
                raise ConfigError(f"threads {self.threads!r}: this host has {cpus} CPU"
                                  f"{'s' if cpus > 1 else ''}; pass 1 to {cpus}")
        if self.measure not in MEASURES:
            raise ConfigError(f"measure {self.measure!r}: choose one of {', '.join(MEASURES)}")
        if self.measure == "again" and self.backend is not None:
            raise ConfigError(f"measuring chooses the backend, and {self.backend} was asked "
                              "for; drop the backend or the measuring")
        if self.cuda_graphs and self.backend not in (None, "tensorrt"):
            raise ConfigError("CUDA graphs are a TensorRT feature; drop --cuda-graphs or use "
                              "the tensorrt backend")
        if self.fusions and (self.backend not in (None, "onnxruntime")
                             or self.precision != "fp32"):
            raise ConfigError("fusions are ONNX Runtime's, for the fp32 graphs; drop them or "
                              "use the onnxruntime backend at fp32")
        if self.hint is not None and (self.hint not in HINTS
                                      or self.backend not in (None, "openvino")):
            raise ConfigError(f"hint {self.hint!r}: OpenVINO takes {' or '.join(HINTS)}, on "
                              "the openvino backend")
