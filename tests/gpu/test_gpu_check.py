"""scripts/gpu_check.sh on the CPU (--cpu: the same checks' code, FP32 against FP32): one
JSON report, every gate judged, exit status 1 when one fails. On a GPU the same command
checks FP16, onnxruntime-gpu and TensorRT."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_gpu_check(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" /
                                                  "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # for its dataclasses
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_dry_run_prints_one_json_report_and_passes():
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu",
                             "--segments", "6", "--samples", "2"], capture_output=True,
                            text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin",
                                            "HOME": str(Path.home())}, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["mode"] == "cpu" and report["passed"] is True
    assert set(report["checks"]) == {"torch_fp16.demo", "torch_fp16.demo_accuracy",
                                     "onnxruntime_gpu"}
    assert report["skipped"]["torch_fp16.minilm"] == "--cpu: the demo model only"
    assert report["skipped"]["tensorrt"] == "--cpu: TensorRT needs a GPU"
    demo = report["checks"]["torch_fp16.demo"]
    assert demo["segments"] == 6 and demo["agreement"] == 1.0 and demo["failures"] == []
    assert report["time"]["passed"] and report["time"]["seconds"] > 0


def test_a_failed_gate_fails_the_check(monkeypatch, capsys):
    gpu_check = load_gpu_check(monkeypatch)

    def run_checks(settings, log):
        return {"checks": {"torch_fp16.demo": {"passed": False, "failures": ["drift"]},
                           "onnxruntime_gpu": {"passed": True}}, "skipped": {}}

    monkeypatch.setattr(gpu_check, "run_checks", run_checks)
    assert gpu_check.main(["--cpu"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False
    monkeypatch.setattr(gpu_check, "run_checks", lambda settings, log: {"checks": {},
                                                                        "skipped": {}})
    assert gpu_check.main(["--cpu", "--budget", "0"]) == 1  # over its time budget
    assert json.loads(capsys.readouterr().out)["time"]["passed"] is False


def test_a_crashing_check_is_a_failed_check_and_the_others_still_run(monkeypatch, tmp_path):
    gpu_check = load_gpu_check(monkeypatch)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(gpu_check, "torch_drift", broken)
    monkeypatch.setattr(gpu_check, "demo_accuracy", lambda settings: {"passed": True})
    monkeypatch.setattr(gpu_check, "onnxruntime_gpu", lambda export, settings: {"passed": True})
    monkeypatch.setattr(gpu_check, "minilm", lambda work: "not installed")
    monkeypatch.setattr("rmt_deploy.export.pipeline.export_checkpoint",
                        lambda *args, **kwargs: type("M", (), {"folder": tmp_path})())
    settings = gpu_check.Settings("cpu", 4, 2, (1,), 100, tmp_path)
    report = gpu_check.run_checks(settings, lambda message: None)
    assert report["checks"]["torch_fp16.demo"]["passed"] is False
    assert "illegal memory access" in report["checks"]["torch_fp16.demo"]["failures"][0]
    assert report["checks"]["onnxruntime_gpu"]["passed"] is True
