"""Interrupted commands: SIGTERM (exit 143) and SIGINT (exit 130) part-way through an
export or a run remove the half-written folder or file; what a SIGKILL leaves is removed
by the next command that writes there (harness: tests/hostile/harness.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest
from harness import (
    BIN,
    ENV,
    LONG_TEXT,
    Case,
    Interrupt,
    build_assets,
    run_case,
    staging,
)

from rmt_deploy.export.pipeline import ExportOptions, export_checkpoint


@pytest.fixture(scope="module")
def assets(encoder_checkpoint, encoder_export, tmp_path_factory):
    return build_assets(encoder_checkpoint, encoder_export, tmp_path_factory.mktemp("assets"))


#: Long enough a validation to be interrupted once the graph is written.
EXPORT = ["-q", "--threads", "1", "--validation-segments", "5000"]


def _export(target):
    def prepare(scene):
        if target == "ex":
            scene.export("ex")
        return [scene.checkpoint(), "-o", target, *EXPORT]
    return prepare


def _run(scene):
    return [scene.export(), scene.text("long.txt", LONG_TEXT), "--json", "--threads", "1",
            "--state-file", "run.state", "--state-every", "20"]


def _validating(target):
    return lambda work: staging(work, target, "model.onnx")


def _saving(work):
    return (work / "run.state").exists()


CASES = [
    Case("export-sigterm", "rmt-export", _export("out"), code=143, says=("terminated",),
         interrupt=Interrupt(_validating("out")), absent=("out",)),
    Case("export-sigint", "rmt-export", _export("out"), code=130, says=("interrupted",),
         interrupt=Interrupt(_validating("out"), signal.SIGINT), absent=("out",)),
    Case("reexport-sigterm-keeps-the-old-export", "rmt-export", _export("ex"), code=143,
         says=("terminated",), interrupt=Interrupt(_validating("ex"))),
    Case("run-sigterm", "rmt-run", _run, code=143, says=("terminated",),
         interrupt=Interrupt(_saving)),
    Case("run-sigint", "rmt-run", _run, code=130, says=("interrupted",),
         interrupt=Interrupt(_saving, signal.SIGINT)),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_interrupt(case, assets, tmp_path):
    run_case(case, tmp_path, assets)


@pytest.mark.slow
def test_what_a_killed_export_leaves_is_removed_by_the_next_export(assets, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([BIN / "rmt-export", assets.checkpoint, "-o", out, *EXPORT],
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not staging(tmp_path, "out", "model.onnx"):
            assert process.poll() is None, process.stderr.read().decode()
            time.sleep(0.005)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    stale = [p.name for p in tmp_path.glob(".out.partial-*")]
    assert stale and all(f"-{process.pid}-" in name for name in stale)
    (tmp_path / ".out.partial-not-ours").mkdir()  # not rmt-deploy's pattern: kept
    export_checkpoint(assets.checkpoint, out, ExportOptions(validation_segments=2, threads=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial-not-ours", "out"]


def test_what_a_killed_run_leaves_is_removed_by_the_next_save(assets, tmp_path):
    export = shutil.copytree(assets.export, tmp_path / "good")
    (tmp_path / "ok.txt").write_text(LONG_TEXT[:3000])
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = tmp_path / f".run.state.tmp-{gone.pid}-0123456789ab"
    stale.write_bytes(b"half a state")
    alive = tmp_path / f".run.state.tmp-{os.getpid()}-0123456789ab"
    alive.write_bytes(b"another run's state being written")
    proc = subprocess.run([BIN / "rmt-run", export, tmp_path / "ok.txt", "--state-file",
                           tmp_path / "run.state", "--state-every", "1"], env=ENV,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [alive.name, "good", "ok.txt"])
