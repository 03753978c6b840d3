"""Hostile standard streams: a closed or read-only stdout, a reader that is gone, a closed
stdin for INPUT '-': a one-line error before any work, never a result silently lost
(harness: tests/hostile/harness.py)."""

from __future__ import annotations

import pytest
from harness import TEXT, Case, build_assets, run_case


@pytest.fixture(scope="module")
def assets(encoder_checkpoint, encoder_export, tmp_path_factory):
    return build_assets(encoder_checkpoint, encoder_export, tmp_path_factory.mktemp("assets"))


def _run(*options, input=None):
    def prepare(scene):
        return [scene.export(), input or scene.text(), *options]
    return prepare


def _triton(scene):
    return ["repo", "--model", scene.export()]


def _triton_run(scene):
    return ["-", "--model", scene.export()]


STDOUT = "stdout is closed or not writable"
STDIN = "stdin is closed or not readable"
CASES = [
    Case("run-closed-stdout", "rmt-run", _run(), stdout="closed", says=(STDOUT,)),
    Case("run-json-closed-stdout", "rmt-run", _run("--json"), stdout="closed", says=(STDOUT,)),
    Case("run-read-only-stdout", "rmt-run", _run(), stdout="read-only", says=(STDOUT,)),
    Case("run-stdout-reader-gone", "rmt-run", _run("--json"), stdout="broken",
         says=("cannot write the result to stdout", "Broken pipe")),
    Case("run-state-file-closed-stdout", "rmt-run", _run("--state-file", "run.state"),
         stdout="closed", says=(STDOUT,), absent=("run.state",)),
    Case("run-closed-stdin-dash", "rmt-run", _run(input="-"), stdin=None, says=(STDIN,)),
    Case("run-dash-closed-stdin-and-stdout", "rmt-run", _run(input="-"), stdin=None,
         stdout="closed", says=(STDOUT,)),
    Case("demo-generate-closed-stdout", "rmt-demo",
         lambda scene: ["generate", "samples", "--tokens", "50"], stdout="closed",
         says=(STDOUT,), absent=("samples",)),
    Case("triton-closed-stdout", "rmt-triton", _triton, stdout="closed", says=(STDOUT,),
         absent=("repo",)),
    Case("triton-run-closed-stdin-dash", "rmt-triton-run", _triton_run, stdin=None,
         says=(STDIN,)),
    Case("triton-run-nothing-listening", "rmt-triton-run",
         lambda scene: [*_triton_run(scene), "--url", "127.0.0.1:9", "--retries", "0"],
         says=("cannot reach Triton at 127.0.0.1:9", "start the server")),
    Case("run-dash-reads-a-pipe", "rmt-run", _run("--json", input="-"), code=0,
         stdin=TEXT.encode()),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_stream(case, assets, tmp_path):
    run_case(case, tmp_path, assets)
