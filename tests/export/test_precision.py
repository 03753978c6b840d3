"""FP16 graphs: made from the validated FP32 graph, judged closed loop against it."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from rmt_deploy.errors import BackendError, ValidationError
from rmt_deploy.export.pipeline import ExportOptions, export_checkpoint
from rmt_deploy.manifest import graph_key
from rmt_deploy.runtime import open_model

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16


@pytest.fixture(scope="module")
def fp16_exports(encoder_checkpoint, decoder_checkpoint, tmp_path_factory):
    options = ExportOptions(precision="fp16", drift_segments=64)
    folder = tmp_path_factory.mktemp("fp16")
    return {name: export_checkpoint(path, folder / name, options)
            for name, path in (("encoder", encoder_checkpoint), ("decoder", decoder_checkpoint))}


def node_input_types(model: onnx.ModelProto) -> dict[str, set[int]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    kinds: dict[str, set[int]] = {}
    for node in inferred.graph.node:
        kinds.setdefault(node.op_type, set()).update(
            types[i] for i in node.input[:1] if i in types)
    return kinds


@pytest.mark.parametrize("variant", ["encoder", "decoder"])
def test_fp16_graph_keeps_sensitive_ops_and_the_boundary_in_fp32(fp16_exports, variant):
    manifest = fp16_exports[variant]
    spec = manifest.graphs[graph_key("step", "fp16")]
    assert spec.precision == "fp16" and spec.file == "model.fp16.onnx"
    model = onnx.load(str(manifest.path(spec.file)))
    assert all(t.type.tensor_type.elem_type in (FLOAT, TensorProto.INT64)
               for t in [*model.graph.input, *model.graph.output])
    kinds = node_input_types(model)
    assert kinds["LayerNormalization"] == {FLOAT}
    assert kinds["Softmax"] == {FLOAT}
    assert HALF in kinds["MatMul"] | kinds.get("Gemm", set())
    halves = [t for t in model.graph.initializer if t.data_type == HALF]
    assert halves and all(np.isfinite(onnx.numpy_helper.to_array(t)).all() for t in halves)


@pytest.mark.parametrize("variant", ["encoder", "decoder"])
def test_fp16_drift_is_measured_and_recorded(fp16_exports, variant):
    drift = fp16_exports[variant].validation["fp16"]
    assert drift["segments"] == 64
    closed = drift["closed_loop"]
    assert 0 < closed["max_abs"]["memory_out"] < 0.05  # weight rounding, not zero
    assert closed["min_memory_cosine"] > 0.999 and closed["agreement"] >= 0.99


def test_fp16_graph_runs_and_agrees_with_fp32(fp16_exports):
    folder = fp16_exports["encoder"].folder
    docs = ["w1 w2 w3 " * 25, "w9 w4 " * 13]
    fp32 = open_model(folder).run(docs)
    fp16 = open_model(folder, precision="fp16").run(docs)
    assert fp16.precision == "fp16"
    for a, b in zip(fp32.outputs, fp16.outputs, strict=True):
        assert a.label == b.label
        np.testing.assert_allclose(a.logits, b.logits, atol=0.05)
        assert not np.array_equal(a.logits, b.logits)


def test_asking_for_a_precision_that_was_not_exported_says_how(encoder_export):
    with pytest.raises(BackendError, match="re-export with --precision fp16"):
        open_model(encoder_export, precision="fp16")


def test_an_fp16_graph_that_disagrees_is_an_export_error(encoder_checkpoint, tmp_path):
    options = ExportOptions(precision="fp16", drift_segments=8, min_agreement=1.01)
    with pytest.raises(ValidationError, match="agrees with FP32 on"):
        export_checkpoint(encoder_checkpoint, tmp_path / "out", options)
    assert not (tmp_path / "out").exists()
