"""Hostile ``rmt-compare --plot`` and ``rmt-export --timing-cache`` targets: a plot never
replaces an artifact being compared, a file of an export folder or the base model, nor an
existing file that is not a plot rmt-compare wrote (without ``--overwrite``), and makes no
folder; a timing cache is never the checkpoint, nor inside the output folder, an export
or the base model. Each is refused before the work runs (harness:
tests/hostile/harness.py)."""

from __future__ import annotations

import pytest
from harness import Case, build_assets, run_case


@pytest.fixture(scope="module")
def assets(encoder_checkpoint, encoder_export, tmp_path_factory):
    return build_assets(encoder_checkpoint, encoder_export, tmp_path_factory.mktemp("assets"))


def _plot(target, *extra):
    """``rmt-compare gp good --plot TARGET`` (two copies of one export)."""
    def prepare(scene):
        scene.export("gp")
        scene.export("good")
        return ["gp", "good", "--segments", "2", "--plot", target, *extra]
    return prepare


def _plot_checkpoint(scene):
    scene.export()
    return [scene.checkpoint(), "good", "--segments", "2", "--plot", "enc.pt", "--overwrite"]


def _plot_onto(name, data, *extra):
    def prepare(scene):
        (scene.work / name).write_bytes(data)
        return _plot(name, *extra)(scene)
    return prepare


def _plot_onto_a_foreign_png(scene):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(scene.work / "figure.png")  # a PNG, not rmt-compare's
    return _plot("figure.png")(scene)


def _plot_below_a_file(scene):
    (scene.work / "plots").write_text("a file\n")
    return _plot("plots/drift.png")(scene)


def _plot_into_base(scene):
    checkpoint, base = scene.authors()
    scene.export()
    return [checkpoint, "good", "--base-model", base, "--segments", "2", "--plot",
            "base/drift.png"]


def _timing_cache(target, out="out"):
    """``rmt-export enc.pt -o OUT --engine --timing-cache TARGET``."""
    def prepare(scene):
        scene.export("gp")
        return [scene.checkpoint(), "-o", out, "--engine", "--timing-cache", target]
    return prepare


def _timing_cache_authors(scene):
    checkpoint, base = scene.authors()
    return [checkpoint, "--base-model", base, "-o", "out", "--engine", "--timing-cache",
            "base/config.json"]


INSIDE = "is inside the export folder"
NOT_OURS = "exists and is not a plot rmt-compare wrote"
CASES = [
    Case("plot-onto-reference-graph", "rmt-compare", _plot("gp/model.onnx"), says=(INSIDE,)),
    Case("plot-onto-reference-graph-overwrite", "rmt-compare",
         _plot("gp/model.onnx", "--overwrite"), says=(INSIDE,)),
    Case("plot-onto-reference-weights", "rmt-compare", _plot("gp/weights.data"),
         says=(INSIDE,)),
    Case("plot-onto-candidate-manifest", "rmt-compare", _plot("good/rmt.json"), says=(INSIDE,)),
    Case("plot-new-file-in-export", "rmt-compare", _plot("good/drift.png"), says=(INSIDE,),
         absent=("good/drift.png",)),
    Case("plot-onto-compared-checkpoint", "rmt-compare", _plot_checkpoint,
         says=("enc.pt, an artifact being compared",)),
    Case("plot-onto-existing-file", "rmt-compare", _plot_onto("notes.png", b"my notes\n"),
         says=("notes.png", NOT_OURS, "--overwrite")),
    Case("plot-onto-a-png-it-did-not-write", "rmt-compare", _plot_onto_a_foreign_png,
         says=("figure.png", NOT_OURS)),
    Case("plot-into-base-model", "rmt-compare", _plot_into_base,
         says=("inside the base model",), absent=("base/drift.png",)),
    Case("plot-missing-folder", "rmt-compare", _plot("plots/drift.png"),
         says=("plots", "does not exist", "create the folder"), absent=("plots",)),
    Case("plot-below-a-file", "rmt-compare", _plot_below_a_file,
         says=("is a file, not a folder",)),
    Case("plot-onto-a-folder", "rmt-compare", _plot("good"), says=("is a folder",)),
    Case("plot-not-png", "rmt-compare", _plot("drift.pdf"), says=("ending in .png",),
         absent=("drift.pdf",)),
]


TIMING_CACHE = [
    Case("timing-cache-onto-checkpoint", "rmt-export", _timing_cache("enc.pt"),
         says=("is the checkpoint",)),
    Case("timing-cache-in-other-export", "rmt-export", _timing_cache("gp/weights.data"),
         says=(INSIDE,)),
    Case("timing-cache-in-output-folder", "rmt-export", _timing_cache("out/timing.cache"),
         says=("is inside the output folder",)),
    Case("timing-cache-in-base-model", "rmt-export", _timing_cache_authors,
         says=("is inside the base model",)),
    Case("timing-cache-missing-folder", "rmt-export", _timing_cache("caches/timing.cache"),
         says=("does not exist",)),
]


@pytest.mark.parametrize("case", CASES + TIMING_CACHE, ids=str)
def test_hostile_output_target(case, assets, tmp_path):
    run_case(case, tmp_path, assets)
