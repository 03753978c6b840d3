"""Hostile ``rmt-export -o`` and ``--convert`` targets: an export replaces only an
earlier export that holds nothing else, never its own inputs, the current or home folder;
``--convert`` never writes over its input, an export or the base model, nor over an
existing file without ``--overwrite`` (harness: tests/hostile/harness.py)."""

from __future__ import annotations

import json

import pytest
from harness import Case, build_assets, run_case


@pytest.fixture(scope="module")
def assets(encoder_checkpoint, encoder_export, tmp_path_factory):
    return build_assets(encoder_checkpoint, encoder_export, tmp_path_factory.mktemp("assets"))


def _export_to(target):
    """``rmt-export enc.pt -o TARGET``."""
    def prepare(scene):
        return [scene.checkpoint(), "-o", target(scene) if callable(target) else target]
    return prepare


def _checkpoint_and_base_inside(scene):  # the reproduction
    scene.export("ex")
    checkpoint, base = scene.authors("ex")
    return [checkpoint, "--base-model", base, "-o", "ex"]


def _base_inside(scene):
    scene.export("ex")
    checkpoint, _ = scene.authors()
    _, base = scene.authors("ex")
    return [checkpoint, "--base-model", base, "-o", "ex"]


def _extra_file(scene):
    (scene.export("ex") / "notes.txt").write_text("mine\n")
    return _export_to("ex")(scene)


def _extra_folder(scene):
    (scene.export("ex") / "runs").mkdir()
    (scene.work / "ex" / "runs" / "log.txt").write_text("mine\n")
    return _export_to("ex")(scene)


def _many_extra_files(scene):
    for name in "abcde":
        (scene.export("ex") if name == "a" else scene.work / "ex").joinpath(
            f"{name}.txt").write_text(name)
    return _export_to("ex")(scene)


def _not_an_export(scene):
    (scene.work / "mine").mkdir()
    (scene.work / "mine" / "thesis.tex").write_text("do not lose this\n")
    return _export_to("mine")(scene)


def _foreign_manifest(scene):
    folder = scene.export("ex")
    (folder / "rmt.json").write_text(json.dumps({"format": "another-tool", "file": "x"}))
    return _export_to("ex")(scene)


def _default_target_taken(scene):
    (scene.work / "enc-export").mkdir()
    (scene.work / "enc-export" / "notes.txt").write_text("mine\n")
    return [scene.checkpoint()]


def _a_file(scene):
    (scene.work / "out").write_text("a file\n")
    return _export_to("out")(scene)


def _link_to_cwd(scene):
    (scene.home / "link").symlink_to(scene.work)
    return _export_to(scene.home / "link")(scene)


def _convert(target, *extra):
    """``rmt-export enc.pt --convert TARGET``, the export ``good/`` beside."""
    def prepare(scene):
        scene.export()
        return [scene.checkpoint(), "--convert", target, *extra]
    return prepare


def _convert_onto_existing(scene):
    (scene.work / "old.pt").write_bytes(b"an older conversion")
    return _convert("old.pt")(scene)


def _convert_into_base(scene):
    checkpoint, base = scene.authors()
    return [checkpoint, "--base-model", base, "--convert", "base/model.pt"]


def _convert_through_link(scene):
    (scene.work / "same.pt").symlink_to("enc.pt")
    return _convert("same.pt", "--overwrite")(scene)


ABOVE = "is the current folder or a folder above it"
INPUT = "an input of this export"
INSIDE = "is inside the export folder"
CASES = [
    Case("export-into-folder-holding-checkpoint-and-base", "rmt-export",
         _checkpoint_and_base_inside, says=(INPUT,)),
    Case("export-into-folder-holding-base", "rmt-export", _base_inside, says=("base", INPUT)),
    Case("export-into-export-with-extra-file", "rmt-export", _extra_file,
         says=("notes.txt", "which rmt-export did not write")),
    Case("export-into-export-with-extra-folder", "rmt-export", _extra_folder,
         says=("runs/log.txt",)),
    Case("export-into-export-with-many-extra-files", "rmt-export", _many_extra_files,
         says=("a.txt, b.txt, c.txt +2 more",)),
    Case("export-into-non-export-folder", "rmt-export", _not_an_export,
         says=("thesis.tex", "not an rmt-export folder")),
    Case("export-into-folder-with-foreign-rmt-json", "rmt-export", _foreign_manifest,
         says=("not an rmt-export folder",)),
    Case("export-default-target-taken", "rmt-export", _default_target_taken,
         says=("enc-export", "notes.txt")),
    Case("export-onto-a-file", "rmt-export", _a_file, says=("is a file",)),
    Case("export-onto-the-checkpoint", "rmt-export", _export_to("enc.pt"), says=(INPUT,)),
    Case("export-dot", "rmt-export", _export_to("."), says=(ABOVE,)),
    Case("export-cwd-parent", "rmt-export", _export_to(".."), says=(ABOVE,)),
    Case("export-root", "rmt-export", _export_to("/"), says=(ABOVE,)),
    Case("export-cwd-through-dot-dot", "rmt-export", _export_to("good/.."), says=(ABOVE,)),
    Case("export-cwd-through-a-link", "rmt-export", _link_to_cwd, says=(ABOVE,)),
    Case("export-home", "rmt-export", _export_to(lambda scene: scene.home),
         says=("is the home folder",)),
    Case("convert-onto-its-input", "rmt-export", _convert("enc.pt"),
         says=("is the checkpoint being converted",)),
    Case("convert-onto-its-input-overwrite", "rmt-export", _convert("enc.pt", "--overwrite"),
         says=("is the checkpoint being converted",)),
    Case("convert-onto-its-input-through-a-link", "rmt-export", _convert_through_link,
         says=("is the checkpoint being converted",)),
    Case("convert-onto-export-model-onnx", "rmt-export",
         _convert("good/model.onnx", "--overwrite"), says=(INSIDE,)),
    Case("convert-onto-export-manifest", "rmt-export", _convert("good/rmt.json"),
         says=(INSIDE,)),
    Case("convert-new-file-in-export", "rmt-export", _convert("good/model.pt"),
         says=(INSIDE,), absent=("good/model.pt",)),
    Case("convert-onto-existing-file", "rmt-export", _convert_onto_existing,
         says=("exists", "--overwrite")),
    Case("convert-into-base-model", "rmt-export", _convert_into_base,
         says=("inside the base model",), absent=("base/model.pt",)),
    Case("convert-onto-a-folder", "rmt-export", _convert("good"), says=("is a folder",)),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_export_target(case, assets, tmp_path):
    run_case(case, tmp_path, assets)
