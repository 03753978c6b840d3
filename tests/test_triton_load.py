"""scripts/triton_load.py, short: concurrent sequences against a real tritonserver for a
few seconds, no errors, and every abandoned sequence evicted after the repository's idle
timeout. The 60 s, 64-sequence figures are in docs/serving.md."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

pytest.importorskip("tritonclient.grpc")

from test_triton_server import ROOT, Server, _require_venv  # noqa: E402, I001

from rmt_deploy.serving.config import ServingOptions  # noqa: E402
from rmt_deploy.serving.repository import write_repository  # noqa: E402


def test_bounded_load_has_no_errors_and_idle_sequences_are_evicted(encoder_export, tmp_path):
    _require_venv()
    repo = tmp_path / "repo"
    write_repository(repo, encoder_export,
                     ServingOptions(name="enc", max_batch_size=8, idle_seconds=2))
    server = Server(repo, tmp_path / "triton.log")
    try:
        run = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "triton_load.py"), "--model",
             str(encoder_export), "--url", server.url, "--name", "enc", "--server-pid",
             str(server.process.pid), "--idle-seconds", "2", "--sequences", "8",
             "--seconds", "3", "--max-segments", "3000", "--tokens", "120",
             "--rss-slack", "0.5", "--warm-up-seconds", "6"],
            capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    assert report["errors"] == 0 and report["segments"] > 0
    assert report["evicted"] == report["abandoned"] == 8
    assert 0 < report["warm_up_seconds"] <= 6 + 1
    print(f"\n{report}")


def _load_script():
    path = ROOT / "scripts" / "triton_load.py"
    spec = importlib.util.spec_from_file_location("triton_load", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_warm_up_outlasts_one_settled_sample_before_a_step(monkeypatch):
    """Measured at 64 sequences with 40-segment chunks: RSS paused for one 5 s sample,
    then stepped up 7%, after a warm-up that had ended on the pause. The warm-up ends
    only once RSS is flat over a whole window."""
    load = _load_script()
    rss = iter([100, 150, 151, 162, 163, 163, 163, 163]).__next__
    taken = []
    monkeypatch.setattr(load, "rss_bytes", lambda pid: taken.append(rss()) or taken[-1])
    monkeypatch.setattr(load.time, "sleep", lambda seconds: None)
    until = [float("inf")]
    load.settle(0, until, longest=60.0)
    assert taken == [100, 150, 151, 162, 163, 163]  # flat over 162 -> 163 -> 163
    assert until[0] < float("inf")  # the clients were told to stop
