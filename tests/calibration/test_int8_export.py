"""rmt-export --precision int8: Q/DQ graphs calibrated on the rolled recurrence, each
policy judged closed loop, the choice and the data recorded in the manifest."""

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, numpy_helper

from rmt_deploy.cli import export_main
from rmt_deploy.errors import ConfigError, ValidationError
from rmt_deploy.export.pipeline import ExportOptions, export_checkpoint
from rmt_deploy.manifest import graph_key, read_manifest
from rmt_deploy.runtime import open_model


def calibration_ids(folder, vocab_low, vocab_high, documents, tokens):
    path = folder / "calibration.npz"
    rng = np.random.default_rng(5)
    np.savez(path, docs=rng.integers(vocab_low, vocab_high, (documents, tokens)))
    return path


@pytest.fixture(scope="module")
def int8_exports(encoder_checkpoint, decoder_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8")
    encoder_data = calibration_ids(folder, 5, 45, 8, 20 * 10)
    decoder_data = calibration_ids(folder / "..", 0, 52, 8, 20 * 5)
    return {
        "encoder": export_checkpoint(encoder_checkpoint, folder / "encoder", ExportOptions(
            precision="int8", calibration=encoder_data, drift_segments=40)),
        "decoder": export_checkpoint(decoder_checkpoint, folder / "decoder", ExportOptions(
            precision="int8", calibration=decoder_data, drift_segments=40,
            int8_policy="linear", calibration_method="percentile")),
        "data": encoder_data,
    }


@pytest.mark.parametrize("variant", ["encoder", "decoder"])
def test_int8_graphs_are_symmetric_qdq_with_fp32_boundaries(int8_exports, variant):
    manifest = int8_exports[variant]
    graphs = ["step", "write"]  # generation's prefill and decode stay FP32
    for name in graphs:
        spec = manifest.graphs[graph_key(name, "int8")]
        assert spec.precision == "int8" and spec.file.endswith(".int8.onnx")
        model = onnx.load(str(manifest.path(spec.file)))
        ops = [node.op_type for node in model.graph.node]
        assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
        zero_points = [t for t in model.graph.initializer if "zero_point" in t.name]
        assert zero_points and not any(numpy_helper.to_array(t).any() for t in zero_points)
        kinds = {t.data_type for t in zero_points}
        assert TensorProto.INT8 in kinds and kinds <= {TensorProto.INT8, TensorProto.INT32}
        assert all(t.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.INT64)
                   for t in [*model.graph.input, *model.graph.output])


def test_every_applicable_policy_is_measured_and_the_choice_recorded(int8_exports):
    record = int8_exports["encoder"].validation["int8"]
    assert set(record["candidates"]) == {"naive", "matmul", "linear"}  # 2 layers: no inner
    for row in record["candidates"].values():
        closed = row["errors"]["closed_loop"]
        assert 0 <= closed["agreement"] <= 1 and closed["min_memory_cosine"] <= 1
        assert closed["max_abs"]["memory_out"] > 0  # quantized: not bit-equal to FP32
        one_step = row["errors"]["open_loop"]  # from FP32's memory each step
        assert 0 < one_step["max_abs"]["memory_out"] <= closed["max_abs"]["memory_out"]
        assert closed["min_memory_cosine"] <= one_step["min_memory_cosine"] <= 1
        assert row["int8_ms"] > 0 and row["fp32_ms"] > 0
        assert row["speedup"] == pytest.approx(row["fp32_ms"] / row["int8_ms"], rel=1e-2)
        assert row["errors"]["segments"] == 40
    chosen = record["candidates"][record["policy"]]
    passing = [name for name, row in record["candidates"].items()
               if row["errors"]["closed_loop"]["agreement"] >= record["min_agreement"]]
    assert record["policy"] in passing
    fastest = max(record["candidates"][n]["speedup"] for n in passing)
    assert chosen["speedup"] >= 0.95 * fastest
    close = [n for n in passing if record["candidates"][n]["speedup"] >= 0.95 * fastest]
    assert chosen["errors"]["closed_loop"]["min_memory_cosine"] == max(
        record["candidates"][n]["errors"]["closed_loop"]["min_memory_cosine"] for n in close)
    calibration = record["calibration"]
    assert calibration["documents"] == 8 and calibration["held_out_documents"] == 2
    assert calibration["steps"] == 6 * 20 and calibration["deepest_segment"] == 19
    assert len(calibration["sha256"]) == 64 and calibration["tokens"] == 8 * 200
    decoder = int8_exports["decoder"].validation["int8"]
    assert decoder["policy"] == "linear" and list(decoder["candidates"]) == ["linear"]
    assert calibration["method"] == "minmax" and decoder["calibration"]["method"] == "percentile"
    assert "write_memory_out" in decoder["closed_loop"]["max_abs"]


def test_the_int8_graph_runs_and_agrees_with_fp32(int8_exports):
    folder = int8_exports["encoder"].folder
    docs = [np.random.default_rng(i).integers(5, 45, 60) for i in range(4)]
    fp32 = open_model(folder).run(docs)
    int8 = open_model(folder, precision="int8").run(docs)
    assert int8.precision == "int8"
    for a, b in zip(fp32.outputs, int8.outputs, strict=True):
        assert a.label == b.label
        np.testing.assert_allclose(a.logits, b.logits, atol=0.2)
    assert read_manifest(folder).graphs["step.int8"].file == "model.int8.onnx"


def test_a_policy_that_loses_accuracy_is_an_error_and_writes_nothing(
        encoder_checkpoint, int8_exports, tmp_path):
    options = ExportOptions(precision="int8", calibration=int8_exports["data"],
                            drift_segments=8, min_agreement=1.01)
    with pytest.raises(ValidationError, match="no INT8 policy keeps the accuracy"):
        export_checkpoint(encoder_checkpoint, tmp_path / "out", options)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options, message", [
    (dict(precision="int8"), "needs calibration documents"),
    (dict(precision="int8", calibration="missing"), "no such calibration"),
    (dict(precision="fp32", calibration="."), "only used with --precision int8"),
    (dict(precision="int8", calibration=".", int8_policy="all"), "unknown INT8 policy"),
    (dict(precision="int4"), "unknown precision"),
    (dict(precision="int8", calibration=".", calibration_method="entropy"),
     "unknown calibration method"),
])
def test_bad_int8_options_fail_before_anything_is_written(encoder_checkpoint, tmp_path,
                                                          options, message):
    with pytest.raises(ConfigError, match=message):
        export_checkpoint(encoder_checkpoint, tmp_path / "out", ExportOptions(**options))
    assert list(tmp_path.iterdir()) == []


def test_cli_int8_errors_are_one_line(encoder_checkpoint, tmp_path):
    result = CliRunner().invoke(export_main, [str(encoder_checkpoint), "-o",
                                              str(tmp_path / "o"), "--precision", "int8"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "rmt-export: error: --precision int8 needs calibration documents: add --calibration "
        "FILE_OR_FOLDER (text like the model's input)"]
    too_little = tmp_path / "few.npy"
    np.save(too_little, np.full((1, 30), 7))
    result = CliRunner().invoke(export_main, [
        str(encoder_checkpoint), "-o", str(tmp_path / "o"), "--precision", "int8",
        "--calibration", str(too_little), "-q"])
    assert result.exit_code == 1 and "at least 2 documents" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_percentile_ranges_clip_what_minmax_keeps(encoder_export, tmp_path):
    from rmt_deploy.calibration.collect import collect_steps
    from rmt_deploy.calibration.policies import policy_named
    from rmt_deploy.calibration.quantize import int8_graph, prepare
    from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine
    from rmt_deploy.runtime.tokens import ArraySource

    manifest = read_manifest(encoder_export)
    rng = np.random.default_rng(3)
    sources = [ArraySource(rng.integers(5, 45, 200), manifest.config) for _ in range(4)]
    steps = collect_steps(OnnxRuntimeEngine(manifest), manifest.load_initial_state(), sources)
    prepare(encoder_export / "model.onnx", tmp_path / "prepared.onnx")
    scales = {}
    for method in ("minmax", "percentile"):
        int8_graph(tmp_path / "prepared.onnx", tmp_path / f"{method}.onnx", steps,
                   policy_named("linear"), method)
        model = onnx.load(str(tmp_path / f"{method}.onnx"))
        scales[method] = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                          if t.name.endswith("_scale") and t.dims == []}
    assert scales["minmax"].keys() == scales["percentile"].keys()
    clipped = [name for name in scales["minmax"]
               if scales["percentile"][name] < scales["minmax"][name] * (1 - 1e-6)]
    assert clipped and all(scales["percentile"][n] <= scales["minmax"][n] * (1 + 1e-6)
                           for n in scales["minmax"])
