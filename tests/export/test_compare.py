"""rmt-compare on every pair of artifact kinds available on CPU (checkpoint, export
folder, its step graphs of each precision, its TensorRT plan through the fake runtime)
and its failures: bad paths, other models, candidates that drift."""

from __future__ import annotations

import json
import re
import shutil
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from fake_tensorrt import install_fake_gpu
from graph_faults import damaged_graph

from rmt_deploy.cli import compare_main
from rmt_deploy.export.compare import CompareOptions, compare_artifacts
from rmt_deploy.files import sha256_file
from rmt_deploy.manifest import MANIFEST_NAME


def rmt_compare(*args):
    return CliRunner().invoke(compare_main, [str(a) for a in args])


@pytest.fixture(scope="module")
def precision_exports(decoder_checkpoint, encoder_checkpoint, tmp_path_factory):
    """The tiny decoder exported with FP16 graphs, the tiny encoder with INT8 graphs."""
    from rmt_deploy.export.pipeline import ExportOptions, export_checkpoint

    root = tmp_path_factory.mktemp("precisions")
    data = root / "calibration.npy"
    np.save(data, np.random.default_rng(0).integers(5, 45, (4, 200)))
    fp16 = export_checkpoint(decoder_checkpoint, root / "fp16", ExportOptions(
        precision="fp16", drift_segments=4)).folder
    int8 = export_checkpoint(encoder_checkpoint, root / "int8", ExportOptions(
        precision="int8", calibration=data, drift_segments=4, int8_policy="linear",
        min_agreement=0.5)).folder
    return fp16, int8


def drifting_export(export, folder, fault="scale"):
    """A copy of ``export`` whose step graph has one weight changed by 1% (or a NaN), its
    manifest hash updated so that the export still opens."""
    shutil.copytree(export, folder)
    damaged_graph(export / "model.onnx", folder / "model.onnx", fault)
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["graphs"]["step"]["sha256"] = sha256_file(folder / "model.onnx")
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("pair", ["checkpoint-export", "export-onnx", "checkpoint-onnx"])
def test_artifacts_of_one_model_agree(encoder_checkpoint, encoder_export, pair):
    paths = {"checkpoint": encoder_checkpoint, "export": encoder_export,
             "onnx": encoder_export / "model.onnx"}
    a, b = pair.split("-")
    result = rmt_compare(paths[a], paths[b], "--segments", "8")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"reference: {paths[a].name} (")
    assert any(line.split()[:1] == ["logits"] for line in lines)
    assert any(line.split()[:1] == ["write_memory_out"] for line in lines)
    assert lines[-1].startswith("pass: ") and lines[-1].endswith(f"reproduces {lines[0][11:]}")
    assert result.stderr == ""


def test_a_decoder_checkpoint_and_its_export_agree_with_the_prefill_graph(
        decoder_checkpoint, decoder_export):
    report = compare_artifacts(decoder_checkpoint, [decoder_export],
                               CompareOptions(segments=6))
    (comparison,) = report.comparisons
    assert report.passed, report.verdict()
    assert set(comparison.errors.open_loop.max_abs) == {"prefill_logits", "logits",
                                                        "memory_out", "write_memory_out"}
    assert comparison.errors.open_loop.steps >= 6


def test_the_graphs_of_each_precision_are_compared_and_fp16_drifts_at_fp32_tolerances(
        precision_exports):
    fp16, int8 = precision_exports
    result = rmt_compare(fp16, fp16 / "model.fp16.onnx", "--segments", "8")
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("rmt-compare: error: model.fp16.onnx (onnxruntime fp16): ")
    assert "(first at segment " in line
    loose = ["--atol", "1", "--closed-loop-atol", "1", "--min-memory-cosine", "0.9",
             "--min-agreement", "0.5", "--segments", "8"]
    result = rmt_compare(fp16, fp16 / "model.fp16.onnx", *loose)
    assert result.exit_code == 0, result.output
    result = rmt_compare(int8 / "model.onnx", int8 / "model.int8.onnx", *loose, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (comparison,) = report["comparisons"]
    assert comparison["candidate"] == "model.int8.onnx (onnxruntime int8)"
    assert comparison["closed_loop"]["max_abs"]["memory_out"] > 0  # INT8 is not FP32


def test_a_tensorrt_plan_is_compared_through_the_fake_runtime(monkeypatch, tmp_path,
                                                              encoder_export):
    from rmt_deploy.export.tensorrt_build import EngineOptions, build_engines

    cuda, _ = install_fake_gpu(monkeypatch)
    folder = shutil.copytree(encoder_export, tmp_path / "exp")
    build_engines(folder, EngineOptions(drift_segments=4))
    result = rmt_compare(folder, folder / "model.plan", "--segments", "8")
    assert result.exit_code == 0, result.output
    assert "reference: exp (onnxruntime fp32)" in result.stdout
    assert "candidate: model.plan (tensorrt fp32)" in result.stdout
    assert cuda.counts["context"] > 0


def test_several_candidates_are_judged_against_one_reference_and_plotted(
        encoder_checkpoint, encoder_export, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs the plot extra (matplotlib)")
    drifting = drifting_export(encoder_export, tmp_path / "drifting")
    plot = tmp_path / "drift.png"
    result = rmt_compare(encoder_checkpoint, encoder_export, drifting, "--segments", "8",
                         "--plot", plot, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert [c["passed"] for c in report["comparisons"]] == [True, False]
    series = report["comparisons"][1]["series"]
    assert len(series["memory_cosine"]["memory_out"]) == 8
    assert max(series["max_abs"]["memory_out"]) > 1e-4
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.stderr.splitlines() == [f"wrote {plot}",
                                          f"rmt-compare: error: {report['verdict']}"]


def test_a_plot_replaces_only_a_plot_rmt_compare_wrote(encoder_export, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs the plot extra (matplotlib)")
    from rmt_deploy.export.plot_file import is_drift_plot

    plot = tmp_path / "drift.png"
    for _ in range(2):  # the second run replaces the first's plot, unasked
        result = rmt_compare(encoder_export, encoder_export, "--segments", "2", "--plot", plot)
        assert result.exit_code == 0, result.output
        assert result.stderr == f"wrote {plot}\n" and is_drift_plot(plot)
    plot.write_bytes(b"mine")
    result = rmt_compare(encoder_export, encoder_export, "--segments", "2", "--plot", plot)
    assert result.exit_code == 1 and "not a plot rmt-compare wrote" in result.stderr
    assert result.stdout == "" and plot.read_bytes() == b"mine"
    result = rmt_compare(encoder_export, encoder_export, "--segments", "2", "--plot", plot,
                         "--overwrite")
    assert result.exit_code == 0 and is_drift_plot(plot)


def test_a_plot_without_matplotlib_is_refused_before_the_comparison(encoder_export, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    result = rmt_compare(encoder_export, encoder_export, "--segments", "2", "--plot",
                         tmp_path / "drift.png")
    assert result.exit_code == 1 and result.stdout == ""  # no table: nothing was compared
    assert result.stderr == "rmt-compare: error: --plot needs matplotlib: pip install " \
                            "'rmt-deploy[plot]'\n"


@pytest.mark.parametrize("fault, gate", [
    ("scale", r"open loop error on \w+ is [0-9.e-]+, above the tolerance 0.0001 "
              r"\(first at segment 0\)$"),
    ("nan", r"value\(s\) of \w+ are NaN or infinite in the open loop run "
            r"\(first at segment 0\)"),
])
def test_a_drifting_candidate_fails_in_one_line_naming_output_and_segment(
        encoder_export, tmp_path, fault, gate):
    drifting = drifting_export(encoder_export, tmp_path / "drifting", fault)
    result = rmt_compare(encoder_export, drifting, "--segments", "6")
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("rmt-compare: error: drifting (onnxruntime fp32): ")
    assert re.search(gate, line), line
    assert result.stdout.splitlines()[-1].split() == ["verdict", "drift"]


def test_per_output_tolerances_follow_polygraphys_syntax(encoder_export, tmp_path):
    drifting = drifting_export(encoder_export, tmp_path / "drifting")
    loose = ["--closed-loop-atol", "10", "--min-memory-cosine", "0", "--min-agreement", "0",
             "--segments", "4"]
    result = rmt_compare(encoder_export, drifting, *loose, "--atol", "10", "--atol",
                         "memory_out:0")
    assert result.exit_code == 1
    assert "open loop error on memory_out" in result.stderr
    result = rmt_compare(encoder_export, drifting, *loose, "--atol", "10")
    assert result.exit_code == 0, result.output
    result = rmt_compare(encoder_export, drifting, "--atol", "logits:x")
    assert result.exit_code == 2 and "give VALUE or OUTPUT:VALUE" in result.stderr


def test_failures_are_one_line_errors(encoder_export, decoder_export, encoder_checkpoint,
                                      tmp_path):
    from conftest import make_encoder

    from rmt_deploy.model.checkpoint import save_checkpoint

    other = save_checkpoint(make_encoder(num_mem_tokens=4), tmp_path / "other.pt", None)
    retrained = save_checkpoint(make_encoder(seed=1), tmp_path / "retrained.pt", None)
    cases = [
        ((tmp_path / "missing", encoder_export), "missing: no such file or folder"),
        ((encoder_export, encoder_export / "write.onnx"),
         "write.onnx: not a step graph of"),
        ((encoder_export, decoder_export), "enc and dec are different models: variant is "
                                           "'encoder' vs 'decoder'"),
        ((encoder_checkpoint, other), "are different models: num_mem_tokens is 3 vs 4"),
        ((tmp_path / "notes.txt", encoder_export), "not a model rmt-run knows"),
    ]
    (tmp_path / "notes.txt").write_text("hello")
    for args, message in cases:
        result = rmt_compare(*args, "--segments", "4")
        assert result.exit_code == 1, (args, result.output)
        (line,) = result.stderr.splitlines()
        assert line.startswith("rmt-compare: error: ") and message in line, line
        assert result.stdout == ""
    result = rmt_compare(encoder_checkpoint, retrained, "--segments", "4")
    assert result.exit_code == 1  # the same contract, other weights: drift
    assert "retrained.pt (torch fp32)" in result.stderr


def test_the_table_gives_each_state_outputs_cosine(armt_export, tmp_path):
    """An ARMT's table: 1 - the closed-loop cosine of every layer's A and z in a column
    of its own ("-" where an output has none), the worst still on the memory cosine row."""
    from rmt_deploy.export.compare import format_table

    drifting = drifting_export(armt_export, tmp_path / "drifting")
    report = compare_artifacts(armt_export, [drifting], CompareOptions(segments=4, threads=1))
    closed = report.comparisons[0].errors.closed_loop
    rows = {line.split()[0]: line.split() for line in format_table(report)
            if line.startswith("  ")}
    assert rows["output"][-3:] == ["1", "-", "cosine"]
    for layer in range(2):
        for name in (f"A_out.{layer}", f"z_out.{layer}"):
            assert rows[name][-1] == f"{max(1 - closed.memory_cosine[name], 0.0):.2e}"
    assert rows["logits"][-1] == "-"
    assert any(float(rows[f"A_out.{layer}"][-1]) > 1e-12 for layer in range(2))
