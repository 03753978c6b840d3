"""The machine a benchmark ran on: the CPU and the flags that decide the fast paths, its
load, and the FP32 GEMM rate torch reaches (the limit FP32 figures are read against);
and a command's peak RSS."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
         "amx_int8")


def cpu_description() -> dict:
    """The CPU model, which of the flags that decide the fast paths it has, its CPUs."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": platform.processor() or platform.machine(), "flags": [],
                "cpus": os.cpu_count()}
    lines = info.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines
                  if line.startswith("model name")), platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in lines
                      if line.startswith("flags")), []))
    return {"model": model, "flags": [f for f in FLAGS if f in flags],
            "missing": [f for f in FLAGS if f not in flags], "cpus": os.cpu_count()}


def gemm_rate(threads: int, shape=(2048, 2048, 2048), repeats: int = 7) -> float:
    """Median GFLOP/s of a torch FP32 matrix product on ``threads`` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    n, k, m = shape
    a, b = torch.randn(n, k), torch.randn(k, m)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    torch.set_num_threads(previous)
    return 2 * n * k * m / statistics.median(times) / 1e9


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def peak_rss_mb(command: list[str]) -> float:
    """Peak RSS (MB) of ``command``, run to completion with its stdout discarded."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
             "stdout=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    kilobytes = subprocess.run([sys.executable, "-c", probe, *command], check=True,
                               capture_output=True, text=True).stdout
    return int(kilobytes) / 1024
