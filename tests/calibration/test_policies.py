"""Policies pick the layers' matmuls to quantize; the memory path stays FP32."""

import onnx
import pytest
import torch
from conftest import BERT_SPECIAL, tiny_bert_config

from rmt_deploy.calibration.policies import (
    POLICY_NAMES,
    applicable_policies,
    nodes_to_quantize,
    policy_named,
)
from rmt_deploy.errors import ConfigError
from rmt_deploy.export.onnx_graph import export_graph
from rmt_deploy.model.base import build_encoder_base
from rmt_deploy.model.factory import encoder_from_base


@pytest.fixture(scope="module", params=["encoder", "decoder"])
def graph(request, encoder_export, decoder_export):
    folder = encoder_export if request.param == "encoder" else decoder_export
    return onnx.load(str(folder / "model.onnx"))


def test_policies_nest_from_most_to_least_quantized(graph):
    matmul = set(nodes_to_quantize(graph, policy_named("matmul")))
    linear = set(nodes_to_quantize(graph, policy_named("linear")))
    assert nodes_to_quantize(graph, policy_named("naive")) is None  # everything
    assert linear < matmul
    weights = {t.name for t in graph.graph.initializer}
    by_name = {node.name: node for node in graph.graph.node}
    assert all(any(i in weights for i in by_name[n].input) for n in linear)
    attention = matmul - linear  # activation x activation: scores and weighted values
    assert attention and not any(i in weights for n in attention for i in by_name[n].input)
    assert all(by_name[n].op_type in ("MatMul", "Gemm") for n in matmul)


def test_edge_layers_stay_fp32_and_two_layer_models_have_no_inner_policy(graph):
    with pytest.raises(ConfigError, match="quantizes nothing in this 2-layer model"):
        nodes_to_quantize(graph, policy_named("linear-inner"))
    assert [p.name for p in applicable_policies(graph)] == ["naive", "matmul", "linear"]


def test_inner_policy_on_a_deeper_graph(tmp_path):
    path = tmp_path / "m.onnx"
    export_graph(deep_encoder(), path, "step", 17)
    graph = onnx.load(str(path))
    inner = nodes_to_quantize(graph, policy_named("linear-inner"))
    assert inner and all("layer.1/" in n or "layer.2/" in n for n in inner)
    assert any("layer.0/" in n for n in nodes_to_quantize(graph, policy_named("linear")))
    assert "linear-inner" in [p.name for p in applicable_policies(graph)]


def deep_encoder():
    config = tiny_bert_config()
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    return encoder_from_base(build_encoder_base(config), num_mem_tokens=3, input_size=16,
                             labels=("a", "b", "c"), special=BERT_SPECIAL).eval()


def test_unknown_policy_is_an_error():
    with pytest.raises(ConfigError, match="unknown INT8 policy 'all'; use one of " +
                       ", ".join(POLICY_NAMES)):
        policy_named("all")
