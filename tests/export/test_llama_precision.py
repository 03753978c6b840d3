"""A Llama base (RMSNorm, rotary, SwiGLU) exports in FP16 and INT8 as BERT and GPT-2 do:
its layers found from the graph's structure, judged closed loop against FP32."""

import numpy as np
import onnx
import pytest
from conftest import make_decoder, write_gpt2_folder
from onnx import TensorProto

from rmt_deploy.calibration.graph_layers import graph_layers
from rmt_deploy.export.pipeline import ExportOptions, export_checkpoint
from rmt_deploy.manifest import graph_key
from rmt_deploy.model.checkpoint import save_checkpoint
from rmt_deploy.runtime import open_model


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    folder = write_gpt2_folder(tmp_path_factory.mktemp("llama-base"), "llama")
    path = tmp_path_factory.mktemp("llama") / "llama.pt"
    return save_checkpoint(make_decoder(family="llama"), path,
                           (folder / "tokenizer.json").read_text())


def test_a_llama_base_exports_in_fp16_with_rmsnorm_in_fp32(llama_checkpoint, tmp_path):
    manifest = export_checkpoint(llama_checkpoint, tmp_path / "out",
                                 ExportOptions(precision="fp16", drift_segments=32, threads=1))
    closed = manifest.validation["fp16"]["closed_loop"]
    assert 0 < closed["max_abs"]["memory_out"] < 0.05  # weight rounding, not zero
    assert closed["min_memory_cosine"] > 0.999 and closed["agreement"] >= 0.99
    model = onnx.load(str(manifest.path(manifest.graphs[graph_key("step", "fp16")].file)))
    halves = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16}
    assert halves
    fp32 = onnx.load(str(manifest.path(manifest.graphs["step"].file)))
    norms = graph_layers(fp32).normalization
    kept = [node for node in model.graph.node if node.name in norms]
    assert kept and not any(halves & set(node.input) for node in kept)
    ids = np.random.default_rng(0).integers(0, 52, 40)
    reference = open_model(manifest.folder).run([ids]).outputs[0]
    half = open_model(manifest.folder, precision="fp16").run([ids]).outputs[0]
    assert half.perplexity == pytest.approx(reference.perplexity, rel=1e-2)


def test_a_llama_base_exports_in_int8(llama_checkpoint, tmp_path):
    data = tmp_path / "calibration.npz"
    np.savez(data, docs=np.random.default_rng(5).integers(0, 52, (8, 100)))
    manifest = export_checkpoint(llama_checkpoint, tmp_path / "out", ExportOptions(
        precision="int8", calibration=data, drift_segments=20, int8_policy="linear",
        min_agreement=0.9, threads=1))  # random weights: 97.7% of greedy ids agree
    record = manifest.validation["int8"]
    assert record["policy"] == "linear"
    closed = record["candidates"]["linear"]["errors"]["closed_loop"]
    assert closed["max_abs"]["memory_out"] > 0 and closed["agreement"] >= 0.9
    model = onnx.load(str(manifest.path(manifest.graphs[graph_key("step", "int8")].file)))
    assert sum(node.op_type == "DequantizeLinear" for node in model.graph.node) > 0
