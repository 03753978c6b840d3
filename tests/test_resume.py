"""rmt-run --state-file/--resume: a run stopped part-way (killed with SIGKILL, or stopped
by an injected limit) and resumed gives exactly the answer of an uninterrupted run; a
state is only resumed with the model and the input it was saved from."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rmt_deploy.cli import run_main
from rmt_deploy.errors import InputError
from rmt_deploy.runtime import open_model
from rmt_deploy.runtime.resume import run_resumable
from rmt_deploy.runtime.state import read_state

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


class Stop(Exception):
    """The injected limit: raised from the progress callback after some saves."""


def encoder_text(words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(45)}" for _ in range(words)) + "\n"


def decoder_text(words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 4)))
                    for _ in range(words)) + "\n"


@pytest.fixture(scope="module")
def models(encoder_export, decoder_export, armt_export):
    return {"encoder": (open_model(encoder_export, threads=1), encoder_text),
            "decoder": (open_model(decoder_export, threads=1), decoder_text),
            "armt": (open_model(armt_export, threads=1), decoder_text)}


def invoke(*args):
    result = CliRunner().invoke(run_main, [str(a) for a in args])
    return result


def report(result) -> dict:
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def same_answer(got, expected) -> None:
    if hasattr(expected, "logits"):
        np.testing.assert_array_equal(got.logits, expected.logits)
    else:
        assert got.perplexity == expected.perplexity
    np.testing.assert_array_equal(got.memory, expected.memory)
    assert (got.tokens, got.segments) == (expected.tokens, expected.segments)


@pytest.mark.parametrize("variant", ["encoder", "decoder", "armt"])
@pytest.mark.parametrize("stop_after", [1, 3])
def test_stopped_and_resumed_equals_uninterrupted(models, variant, stop_after, tmp_path):
    model, make_text = models[variant]
    path = tmp_path / "doc.txt"
    path.write_text(make_text(173, seed=stop_after))
    expected = model.run_one(path)
    state = tmp_path / "run.state"
    calls = []

    def limit(done, total):
        calls.append(done)
        if len(calls) == stop_after:
            raise Stop

    with pytest.raises(Stop):
        run_resumable(model, path, state_file=state, every=3, progress=limit)
    assert state.is_file()
    saved = model.restore_session(read_state(state))
    assert 0 < saved.tokens < expected.tokens
    run = run_resumable(model, path, state_file=state, every=3, resume=state)
    same_answer(run.outputs[0], expected)
    assert not state.exists()  # a completed run leaves no state behind


def test_a_run_killed_with_sigkill_resumes_to_the_same_answer(models, encoder_export,
                                                              tmp_path):
    model, make_text = models["encoder"]
    path = tmp_path / "long.txt"
    path.write_text(make_text(30_000, seed=7))  # 3,000 segments: a few seconds
    state = tmp_path / "run.state"
    command = [sys.executable, "-m", "rmt_deploy.run", str(encoder_export), str(path),
               "--json", "--threads", "1", "--state-file", str(state), "--state-every", "20"]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it could be killed"
    time.sleep(0.05)  # let it write a few more states, maybe mid-write
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    part = model.restore_session(read_state(state))  # whole: states are renamed into place
    assert 0 < part.tokens < 30_000
    resumed = subprocess.run([*command, "--resume", str(state)], env=ENV,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads(resumed.stdout)
    expected = model.run_one(path)
    np.testing.assert_array_equal(np.float32(got["logits"]), expected.logits)
    assert got["tokens"] == expected.tokens == 30_000
    assert not state.exists()


def test_cli_state_file_gives_the_plain_answer(encoder_export, tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(encoder_text(95, seed=1))
    plain = report(invoke(encoder_export, path, "--json", "--threads", "1"))
    state = tmp_path / "s.state"
    saved = report(invoke(encoder_export, path, "--json", "--threads", "1", "--state-file",
                          state, "--state-every", "1"))
    assert saved["logits"] == plain["logits"] and saved["tokens"] == plain["tokens"] == 95
    assert not state.exists()


def test_armt_cli_state_file_and_resume_give_the_plain_answer(models, armt_export,
                                                              tmp_path):
    """rmt-run --state-file of the published ARMT (a state of every layer's A and z, and
    started): stopped part-way, the state holds every pair; --resume, alone or with
    --state-file, gives the plain run's perplexity and removes the state."""
    from rmt_deploy.contract import state_pairs
    from rmt_deploy.runtime.state import unpack

    model, make_text = models["armt"]
    path = tmp_path / "doc.txt"
    path.write_text(make_text(95, seed=8))
    plain = report(invoke(armt_export, path, "--json", "--threads", "1"))
    state = tmp_path / "s.state"
    saved = report(invoke(armt_export, path, "--json", "--threads", "1", "--state-file",
                          state, "--state-every", "1"))
    assert saved["perplexity"] == plain["perplexity"] and saved["tokens"] == plain["tokens"]
    assert not state.exists()
    for extra in ((), ("--state-file", state)):
        stopped_state(model, path, state)
        _, arrays = unpack(state.read_bytes())
        assert {f"state/{pair.name_in}" for pair in state_pairs(model.config)} <= set(arrays)
        assert arrays["state/started"].tolist() == [[1.0]]  # past the first segment
        partial = model.restore_session(read_state(state))
        assert 0 < partial.tokens < plain["tokens"]
        resumed = report(invoke(armt_export, path, "--json", "--threads", "1", "--resume",
                                state, *extra))
        assert resumed["perplexity"] == plain["perplexity"]
        assert (resumed["tokens"], resumed["segments"]) == (plain["tokens"],
                                                            plain["segments"])
        assert 0 < resumed["resumed_tokens"] < plain["tokens"]
        assert not state.exists()


def stopped_state(model, path: Path, state: Path) -> Path:
    def limit(_done, _total):
        raise Stop

    with pytest.raises(Stop):
        run_resumable(model, path, state_file=state, every=2, progress=limit)
    return state


def test_resume_checks_the_model_and_the_input(models, encoder_export, decoder_export,
                                               tmp_path):
    model, make_text = models["encoder"]
    path = tmp_path / "doc.txt"
    path.write_text(make_text(120, seed=3))
    state = stopped_state(model, path, tmp_path / "s.state")
    other_input = tmp_path / "other.txt"
    other_input.write_text(make_text(120, seed=4))  # as long, other words
    shorter = tmp_path / "shorter.txt"
    shorter.write_text(make_text(110, seed=3))
    truncated = tmp_path / "truncated.state"
    truncated.write_bytes(state.read_bytes()[:-40])
    session_state = tmp_path / "session.state"
    session = model.session()
    session.feed("w1 w2")
    session_state.write_bytes(session.save())
    cases = [
        ((encoder_export, other_input, "--resume", state), "another input"),
        ((encoder_export, shorter, "--resume", state), "120 tokens"),
        ((decoder_export, path, "--resume", state), "another model"),
        ((encoder_export, path, "--resume", truncated), "truncated"),
        ((encoder_export, path, "--resume", tmp_path / "missing.state"), "no such state"),
        ((encoder_export, path, "--resume", session_state), "not a state written by rmt-run"),
        ((encoder_export, path, "--state-file", state, "--generate", "3"), "--generate"),
    ]
    for args, words in cases:
        result = invoke(*args)
        assert result.exit_code == 1, (args, result.output)
        message = result.stderr.strip()
        assert "\n" not in message and "Traceback" not in result.output
        assert message.startswith("rmt-run: error: ") and words in message, (args, message)
    assert state.is_file()  # refused resumes leave the state as it was
    run = run_resumable(model, path, state_file=None, every=2, resume=state)
    same_answer(run.outputs[0], model.run_one(path))


def test_resumable_run_refuses_bad_arguments(models, tmp_path):
    model, _ = models["encoder"]
    path = tmp_path / "doc.txt"
    path.write_text("[CLS] [SEP]\n")
    with pytest.raises(InputError, match=">= 1"):
        run_resumable(model, path, state_file=None, every=0)
    with pytest.raises(InputError, match="no tokens"):
        run_resumable(model, path, state_file=None, every=1)


# ---------------------------------------------------------------- what a state file may replace


def refused(result, *fragments) -> str:
    assert result.exit_code == 1, (result.output, result.exception)
    message = result.stderr.strip()
    assert "\n" not in message and message.startswith("rmt-run: error: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


@pytest.fixture
def export_copy(encoder_export, tmp_path) -> Path:
    return Path(shutil.copytree(encoder_export, tmp_path / "export"))


def _notes(tmp, export, doc):
    (tmp / "notes.txt").write_text("my notes\n")
    return export, tmp / "notes.txt", "not a state saved by rmt-run"


def _the_input(tmp, export, doc):
    return export, doc, "is the input of this run"


def _input_through_a_link(tmp, export, doc):
    (tmp / "link.state").symlink_to(doc)
    return export, tmp / "link.state", "is the input of this run"


def _the_manifest(tmp, export, doc):
    return export, export / "rmt.json", "inside the export folder"


def _a_graph_of_the_model_file(tmp, export, doc):
    return export / "model.onnx", export / "memory_in.init.npy", "inside the export folder"


def _a_new_file_in_the_export(tmp, export, doc):
    return export, export / "run.state", "inside the export folder"


def _the_model_file(tmp, export, doc):
    return export / "model.onnx", export / "model.onnx", "is the model of this run"


def _a_folder(tmp, export, doc):
    (tmp / "states").mkdir()
    return export, tmp / "states", "is a folder"


STATE_CASES = [_notes, _the_input, _input_through_a_link, _the_manifest,
               _a_graph_of_the_model_file, _a_new_file_in_the_export, _the_model_file, _a_folder]


@pytest.mark.parametrize("case", STATE_CASES, ids=[c.__name__.strip("_") for c in STATE_CASES])
def test_state_file_refuses_what_rmt_run_did_not_write(case, export_copy, tmp_path,
                                                       monkeypatch):
    doc = tmp_path / "doc.txt"
    doc.write_text(encoder_text(60, seed=2))
    model, state, words = case(tmp_path, export_copy, doc)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    import rmt_deploy.runtime as runtime

    def never(*args, **kwargs):
        raise AssertionError("the model was opened before the state file was checked")

    monkeypatch.setattr(runtime, "open_model", never)
    refused(invoke(model, doc, "--state-file", state, "--threads", "1"), str(state), words)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_run_resumable_refuses_a_file_that_is_not_a_state(models, tmp_path):
    model, make_text = models["encoder"]
    path = tmp_path / "doc.txt"
    path.write_text(make_text(40, seed=1))
    (tmp_path / "notes.txt").write_text("notes")
    for state, words in ((tmp_path / "notes.txt", "not a state"), (path, "the input")):
        with pytest.raises(InputError, match=words):
            run_resumable(model, path, state_file=state, every=1)
    assert (tmp_path / "notes.txt").read_text() == "notes"
    assert path.read_text() == make_text(40, seed=1)


def test_resume_of_a_file_that_is_not_a_state_is_one_line(encoder_export, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(encoder_text(40, seed=1))
    (tmp_path / "notes.txt").write_text("notes")
    refused(invoke(encoder_export, doc, "--resume", tmp_path / "notes.txt"),
            "not an rmt-deploy session state")
    assert (tmp_path / "notes.txt").read_text() == "notes"


def test_a_resumed_state_is_removed_even_without_a_new_save(models, tmp_path):
    model, make_text = models["encoder"]
    path = tmp_path / "doc.txt"
    path.write_text(make_text(95, seed=5))
    state = stopped_state(model, path, tmp_path / "s.state")
    run = run_resumable(model, path, state_file=state, every=1000, resume=state)
    same_answer(run.outputs[0], model.run_one(path))
    assert not state.exists()


def test_an_old_state_not_written_by_this_run_is_kept(models, tmp_path):
    model, make_text = models["encoder"]
    path = tmp_path / "doc.txt"
    path.write_text(make_text(95, seed=5))
    state = stopped_state(model, path, tmp_path / "s.state")
    saved = state.read_bytes()
    run_resumable(model, path, state_file=state, every=1000)  # too short to save
    assert state.read_bytes() == saved


@pytest.mark.parametrize("when", ["between saves", "after the last save"])
def test_a_file_put_in_place_of_the_state_during_the_run_is_kept(models, tmp_path, when):
    model, make_text = models["encoder"]
    path = tmp_path / "doc.txt"
    path.write_text(make_text(95, seed=5))  # 10 segments
    state = tmp_path / "s.state"

    def meanwhile(done, total):
        if (done == 2) if when == "between saves" else (done == total):
            state.unlink()
            state.write_text("the user's file\n")

    if when == "between saves":
        with pytest.raises(InputError, match="replaced by another file during the run"):
            run_resumable(model, path, state_file=state, every=2, progress=meanwhile)
    else:
        run_resumable(model, path, state_file=state, every=2, progress=meanwhile)
    assert state.read_text() == "the user's file\n"


def test_resume_alone_goes_on_saving_to_its_state_and_removes_it(models, encoder_export,
                                                                  tmp_path):
    model, make_text = models["encoder"]
    path = tmp_path / "doc.txt"
    path.write_text(make_text(95, seed=6))
    state = stopped_state(model, path, tmp_path / "s.state")
    resumed = report(invoke(encoder_export, path, "--json", "--threads", "1", "--resume",
                            state))
    assert resumed["logits"] == [float(x) for x in model.run_one(path).logits]
    assert not state.exists()


def test_a_resumed_run_counts_its_speed_on_the_tokens_it_ran(models, tmp_path):
    model, make_text = models["encoder"]
    path = tmp_path / "doc.txt"
    path.write_text(make_text(95, seed=7))
    state = stopped_state(model, path, tmp_path / "s.state")  # stopped after 2 segments
    run = run_resumable(model, path, state_file=None, every=1000, resume=state)
    assert run.resumed_tokens == 2 * model.config.segment_size < run.tokens
    assert run.tokens_per_second == pytest.approx((run.tokens - run.resumed_tokens)
                                                  / run.seconds)
    fresh = run_resumable(model, path, state_file=None, every=1000)
    assert fresh.resumed_tokens == 0
    assert fresh.tokens_per_second == pytest.approx(fresh.tokens / fresh.seconds)
