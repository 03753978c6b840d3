"""Hostile ``rmt-run --state-file`` / ``--resume`` values: a state file never replaces or
deletes a file rmt-run did not write (harness: tests/hostile/harness.py)."""

from __future__ import annotations

import os

import pytest
from harness import Case, build_assets, run_case


@pytest.fixture(scope="module")
def assets(encoder_checkpoint, encoder_export, tmp_path_factory):
    return build_assets(encoder_checkpoint, encoder_export, tmp_path_factory.mktemp("assets"))


def run(scene, *state_args, model=None):
    """``rmt-run good ok.txt --json`` with the given options."""
    model = model or scene.export()
    return [model, scene.text(), "--json", "--threads", "1", *state_args]


def _notes(scene):
    (scene.work / "n.txt").write_text("notes\n")
    return run(scene, "--state-file", "n.txt")


def _in_export(file):
    def prepare(scene):
        return run(scene, "--state-file", f"good/{file}")
    return prepare


def _folder(scene):
    (scene.work / "states").mkdir()
    return run(scene, "--state-file", "states")


def _link_to_input(scene):
    args = run(scene, "--state-file", "link.state")
    (scene.work / "link.state").symlink_to("ok.txt")
    return args


def _hard_link_to_input(scene):
    args = run(scene, "--state-file", "same.state")
    os.link(scene.work / "ok.txt", scene.work / "same.state")
    return args


def _model_file(scene):
    model = scene.export() / "model.onnx"
    return run(scene, "--state-file", "good/model.onnx", model=model)


def _checkpoint(scene):
    return run(scene, "--state-file", "enc.pt", model=scene.checkpoint())


def _resume_notes(scene):
    (scene.work / "n.txt").write_text("notes\n")
    return run(scene, "--resume", "n.txt")


def _resume_notes_as_state(scene):
    (scene.work / "n.txt").write_text("notes\n")
    return run(scene, "--state-file", "n.txt", "--resume", "n.txt")


def _fresh(scene):
    return run(scene, "--state-file", "run.state", "--state-every", "1")


NOT_A_STATE = "not a state saved by rmt-run"
INPUT, MODEL = "is the input of this run", "is the model of this run"
EXPORT = "inside the export folder"
CASES = [
    Case("state-file-notes", "rmt-run", _notes, says=("n.txt", NOT_A_STATE)),
    Case("state-file-input", "rmt-run", lambda s: run(s, "--state-file", "ok.txt"),
         says=("ok.txt", INPUT)),
    Case("state-file-manifest", "rmt-run", _in_export("rmt.json"), says=("rmt.json", EXPORT)),
    Case("state-file-graph", "rmt-run", _in_export("model.onnx"), says=(EXPORT,)),
    Case("state-file-new-file-in-export", "rmt-run", _in_export("run.state"), says=(EXPORT,),
         absent=("good/run.state",)),
    Case("state-file-folder", "rmt-run", _folder, says=("is a folder",)),
    Case("state-file-link-to-input", "rmt-run", _link_to_input, says=(INPUT,)),
    Case("state-file-hard-link-to-input", "rmt-run", _hard_link_to_input, says=(INPUT,)),
    Case("state-file-model-file", "rmt-run", _model_file, says=(MODEL,)),
    Case("state-file-checkpoint-model", "rmt-run", _checkpoint, says=("enc.pt", MODEL)),
    Case("resume-notes", "rmt-run", _resume_notes, says=("not an rmt-deploy session state",)),
    Case("state-file-and-resume-notes", "rmt-run", _resume_notes_as_state,
         says=(NOT_A_STATE,)),
    Case("state-file-fresh-completes", "rmt-run", _fresh, code=0, absent=("run.state",)),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_state_file(case, assets, tmp_path):
    run_case(case, tmp_path, assets)
