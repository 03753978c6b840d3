"""Torch-side commands choose their threads: --threads, else the CPUs not kept busy."""

from __future__ import annotations

import os

import torch

from rmt_deploy.export.pipeline import ExportOptions, export_checkpoint
from rmt_deploy.runtime import options


def test_idle_cpus_leave_the_busy_ones(monkeypatch):
    monkeypatch.setattr(options, "host_cpus", lambda: 4)
    for load, idle in ((0.2, 4), (1.6, 2), (3.4, 1), (40.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert options.idle_cpus() == idle


def test_export_runs_torch_on_the_idle_cpus_by_default(encoder_checkpoint, tmp_path,
                                                       monkeypatch):
    from rmt_deploy.export import pipeline

    monkeypatch.setattr(pipeline, "idle_cpus", lambda: 1)
    torch.set_num_threads(2)
    export_checkpoint(encoder_checkpoint, tmp_path / "out", ExportOptions(validation_segments=2))
    assert torch.get_num_threads() == 1
