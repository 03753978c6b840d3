"""An opened model is immutable: a folder replaced (as rmt-export replaces it) or a file
changed in place under it never mixes two models into one answer."""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest

from rmt_deploy.errors import InputError, ManifestError
from rmt_deploy.files import atomic_folder
from rmt_deploy.runtime import open_model
from rmt_deploy.runtime.pool import SessionPool

IDS = list(np.arange(35) % 40 + 5)  # 4 segments: the write graph runs, loaded when first used


def _other_weights(export: Path, target: Path) -> Path:
    """A copy of ``export`` with other weights of the same shapes (hashes updated)."""
    folder = Path(shutil.copytree(export, target))
    data = json.loads((folder / "rmt.json").read_text())
    weights = np.fromfile(folder / "weights.data", np.uint8)
    for entry in data["weights"]["tensors"].values():
        if entry["dtype"] == "float32":
            view = weights[entry["offset"]: entry["offset"] + entry["bytes"]].view(np.float32)
            view[...] = -1.5 * view
    (folder / "weights.data").unlink()
    weights.tofile(folder / "weights.data")
    digest = hashlib.sha256((folder / "weights.data").read_bytes()).hexdigest()
    for graph in data["graphs"].values():
        for entry in graph["data"]:
            entry["sha256"] = digest
    (folder / "rmt.json").write_text(json.dumps(data, indent=2))
    return folder


def _swap(live: Path, other: Path) -> None:
    """Replace ``live`` by a copy of ``other`` the way rmt-export does."""
    with atomic_folder(live) as stage:
        for file in other.iterdir():
            shutil.copy(file, stage / file.name)


@pytest.fixture
def folders(encoder_export, tmp_path):
    live = Path(shutil.copytree(encoder_export, tmp_path / "live"))
    return live, _other_weights(encoder_export, tmp_path / "other")


def _logits(folder: Path, ids=IDS) -> np.ndarray:
    return open_model(folder, backend="onnxruntime", threads=1).run_one(ids).logits


def test_a_folder_replaced_under_a_run_leaves_it_on_the_model_it_opened(folders):
    live, other = folders
    opened_answer, other_answer = _logits(live), _logits(other)
    assert np.abs(opened_answer - other_answer).max() > 1e-3  # two models, told apart
    model = open_model(live, backend="onnxruntime", threads=1)
    _swap(live, other)
    np.testing.assert_allclose(model.run_one(IDS).logits, opened_answer, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_logits(live), other_answer, rtol=0, atol=1e-6)


def test_a_file_changed_in_place_under_a_run_fails_it_clearly(folders):
    live, other = folders
    model = open_model(live, backend="onnxruntime", threads=1)
    with open(live / "weights.data", "r+b") as handle:  # same file, other bytes
        handle.write((other / "weights.data").read_bytes())
    with pytest.raises(ManifestError, match="weights.data: changed or replaced since the "
                                            "model was opened; open the model again"):
        model.run_one(IDS)


def test_a_session_pool_serving_while_its_folder_is_swapped_stays_on_its_model(folders):
    live, other = folders
    expected = _logits(live)
    with SessionPool(open_model(live, backend="onnxruntime", threads=1)) as pool:
        first = pool.open()
        pool.feed(first, IDS[:20])
        _swap(live, other)
        pool.feed(first, IDS[20:])
        second = pool.open()
        pool.feed(second, IDS)
        for session in (first, second):
            np.testing.assert_allclose(pool.result(session).logits, expected, rtol=0,
                                       atol=1e-6)
        saved = pool.save(first)
    with SessionPool(open_model(live, backend="onnxruntime", threads=1)) as swapped, \
            pytest.raises(InputError, match="another model"):
        swapped.restore(saved)  # the folder's model now is not the one that saved it


def test_a_state_saved_after_a_swap_restores_only_into_the_model_that_saved_it(
        folders, encoder_export):
    live, other = folders
    with SessionPool(open_model(live, backend="onnxruntime", threads=1)) as pool:
        session = pool.open()
        pool.feed(session, IDS)
        _swap(live, other)
        saved = pool.save(session)  # labelled with the model it holds, not the folder's now
    with SessionPool(open_model(live, backend="onnxruntime", threads=1)) as swapped, \
            pytest.raises(InputError, match="another model"):
        swapped.restore(saved)
    with SessionPool(open_model(encoder_export, backend="onnxruntime", threads=1)) as same:
        restored = same.restore(saved)
        np.testing.assert_allclose(same.result(restored).logits, _logits(encoder_export),
                                   rtol=0, atol=1e-6)


def test_rmt_run_reading_a_slow_pipe_while_the_folder_is_reexported_answers_as_opened(
        folders):
    """The issue's case: ``rmt-run live - --json`` reads slowly from a pipe while the
    folder is replaced; it must give the opened model's answer (or fail clearly)."""
    live, other = folders
    text = " ".join(f"w{(7 * i) % 45}" for i in range(25)) + "\n"
    run = [str(Path(sys.executable).parent / "rmt-run"), str(live), "-", "--json",
           "--backend", "onnxruntime", "--threads", "1"]
    opened_answer = json.loads(subprocess.run(run, input=text.encode(), capture_output=True,
                                              check=True).stdout)["logits"]
    process = subprocess.Popen(run, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdin.write(text[:20].encode())
    process.stdin.flush()
    deadline = time.monotonic() + 120
    while _unread(process.stdin) and process.poll() is None:  # read: the model is open
        assert time.monotonic() < deadline
        time.sleep(0.01)
    _swap(live, other)
    out, err = process.communicate(text[20:].encode(), timeout=120)
    assert process.returncode == 0, err
    np.testing.assert_allclose(json.loads(out)["logits"], opened_answer, rtol=0, atol=1e-6)


def _unread(pipe) -> int:
    """Bytes written to ``pipe`` that its reader has not read yet."""
    return int.from_bytes(fcntl.ioctl(pipe.fileno(), termios.FIONREAD, b"\0" * 4), "little")
