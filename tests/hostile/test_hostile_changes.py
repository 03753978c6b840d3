"""Exports that change under the tool or contradict themselves: a folder replaced or a
file changed in place while a run uses it, and a manifest whose derived config fields
disagree with the fields they derive from, hashes updated (harness:
tests/hostile/harness.py)."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import termios
import time

import pytest
from harness import BIN, ENV, TEXT, TIMEOUT, Case, build_assets, run_case
from test_hostile_models import _config, _tampered


@pytest.fixture(scope="module")
def assets(encoder_checkpoint, encoder_export, tmp_path_factory):
    return build_assets(encoder_checkpoint, encoder_export, tmp_path_factory.mktemp("assets"))


CASES = [  # the example, on the tiny encoder: input 16 and 3 memory tokens give 10
    Case("export-config-segment-size-contradicts-input-size", "rmt-run",
         _tampered(_config(segment_size=5)),
         says=("rmt.json", "segment_size 5", "input_size 16", "num_mem_tokens 3", "give 10")),
    Case("export-config-alignment-contradicts-variant", "rmt-run",
         _tampered(_config(alignment="left")),
         says=("rmt.json", "alignment 'left'", "variant 'encoder'")),
    Case("export-config-memory-ids-contradict-vocabulary", "rmt-run",
         _tampered(_config(mem_token_ids=[5, 6, 7])),
         says=("rmt.json", "mem_token_ids [5, 6, 7]", "vocab_size 53")),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_change(case, assets, tmp_path):
    run_case(case, tmp_path, assets)


def _unread(pipe) -> int:
    return int.from_bytes(fcntl.ioctl(pipe.fileno(), termios.FIONREAD, b"\0" * 4), "little")


def test_hostile_weights_changed_in_place_during_a_run(assets, tmp_path):
    """``rmt-run live -`` reads slowly from a pipe; meanwhile ``live/weights.data`` is
    overwritten in place (same file, other bytes): one line, exit 1, no mixed answer.
    (A folder replaced whole keeps the run on its model: tests/runtime/
    test_opened_model.py.)"""
    live = shutil.copytree(assets.export, tmp_path / "live")
    process = subprocess.Popen([str(BIN / "rmt-run"), str(live), "-", "--json", "--threads",
                                "1", "--backend", "onnxruntime"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                               cwd=tmp_path)
    process.stdin.write(TEXT[:20].encode())
    process.stdin.flush()
    deadline = time.monotonic() + TIMEOUT
    while _unread(process.stdin) and process.poll() is None:  # read: the model is open
        assert time.monotonic() < deadline
        time.sleep(0.01)
    weights = (live / "weights.data").read_bytes()
    with open(live / "weights.data", "r+b") as handle:
        handle.write(bytes(255 - byte for byte in weights[:4096]))
    out, err = process.communicate(TEXT[20:].encode(), timeout=TIMEOUT)
    lines = err.decode().splitlines()
    assert process.returncode == 1 and out == b"", err
    assert len(lines) == 1 and "Traceback" not in lines[0], err
    assert "weights.data: changed or replaced since the model was opened" in lines[0]
