"""Layer families found from the step graph's structure: BERT and GPT-2 as their module
names say, a Llama base (RMSNorm, rotary, SwiGLU) alike, and the FP32 hook for the
recurrent state's update."""

import re

import onnx
import pytest
from conftest import make_decoder
from onnx import TensorProto

from rmt_deploy.calibration.graph_layers import graph_layers
from rmt_deploy.calibration.policies import applicable_policies, nodes_to_quantize, policy_named
from rmt_deploy.export.onnx_graph import export_graph
from rmt_deploy.export.precision import fp16_graph
from rmt_deploy.spec import FP32_SCOPE

#: The BERT and GPT-2 layer names the layers were once matched by.
NAMED_LAYER = re.compile(r"/(encoder/layer|transformer/h)\.(\d+)/")


@pytest.fixture(scope="module")
def llama_graph(tmp_path_factory) -> onnx.ModelProto:
    path = tmp_path_factory.mktemp("llama") / "model.onnx"
    export_graph(make_decoder(family="llama"), path, "step", 17)
    return onnx.load(str(path))


@pytest.fixture(scope="module", params=["encoder", "decoder"])
def named_graph(request, encoder_export, decoder_export):
    folder = encoder_export if request.param == "encoder" else decoder_export
    return onnx.load(str(folder / "model.onnx"))


def test_bert_and_gpt2_layers_are_the_ones_their_names_say(named_graph):
    layers = graph_layers(named_graph).layer_of
    assert layers == {node.name: int(match.group(2)) for node in named_graph.graph.node
                      if (match := NAMED_LAYER.search(node.name))}


def by_name(graph: onnx.ModelProto) -> dict:
    return {node.name: node for node in graph.graph.node}


def test_a_llama_graph_has_its_layers_attention_and_rmsnorm_found(llama_graph):
    roles = graph_layers(llama_graph)
    nodes = by_name(llama_graph)
    assert sorted(set(roles.layer_of.values())) == [0, 1]
    assert all("/layers." in name for name in roles.layer_of)
    # the attention: Softmax and the mask add and scale between the scores and it
    kinds = sorted(nodes[name].op_type for name in roles.attention_fp32)
    assert kinds == ["Add", "Add", "Mul", "Mul", "Softmax", "Softmax"]
    # RMSNorm, twice per layer and once at the end: x^2, its mean, eps, sqrt, 1/., x * .,
    # and the weight
    norms = [nodes[name] for name in roles.normalization]
    means = [node for node in norms if node.op_type == "ReduceMean"]
    assert len(means) == 5
    assert sum(node.op_type == "Pow" for node in norms) == 5
    assert sum(node.op_type == "Sqrt" for node in norms) == 5
    assert sum(node.op_type == "Mul" for node in norms) == 10  # x * 1/rms, then the weight
    assert not roles.state_fp32


def test_a_llama_graph_gets_the_int8_policies(llama_graph):
    nodes = by_name(llama_graph)
    linear = nodes_to_quantize(llama_graph, policy_named("linear"))
    matmul = nodes_to_quantize(llama_graph, policy_named("matmul"))
    # q, k, v, o, gate, up, down in each of the 2 layers; the head stays FP32
    assert len(linear) == 14 and all(nodes[n].op_type == "MatMul" for n in linear)
    assert len(set(matmul) - set(linear)) == 4  # scores and weighted values, per layer
    assert [p.name for p in applicable_policies(llama_graph)] == ["naive", "matmul", "linear"]


def input_types(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Each node's input element types."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return {node.name: [types[i] for i in node.input if i in types]
            for node in inferred.graph.node}


def test_a_llama_fp16_graph_keeps_rmsnorm_and_attention_in_fp32(llama_graph, tmp_path):
    source, target = tmp_path / "model.onnx", tmp_path / "model.fp16.onnx"
    onnx.save(llama_graph, str(source))
    fp16_graph(source, target)
    model = onnx.load(str(target))
    types = input_types(model)
    roles = graph_layers(llama_graph)
    for name in roles.normalization | roles.attention_fp32:
        assert set(types[name]) <= {TensorProto.FLOAT, TensorProto.INT64}, name
    linear = nodes_to_quantize(llama_graph, policy_named("linear"))
    assert all(TensorProto.FLOAT16 in types[name] for name in linear)


def with_state_scope(graph: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """``graph`` with node ``name`` moved under a module named ``FP32_SCOPE``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(graph)
    node = next(node for node in copy.graph.node if node.name == name)
    scope, op = name.rsplit("/", 1)
    node.name = f"{scope}/{FP32_SCOPE}/{op}"
    return copy


def test_state_update_nodes_stay_fp32_by_scope_or_declared_output(llama_graph, tmp_path):
    linear = nodes_to_quantize(llama_graph, policy_named("linear"))
    down = next(n for n in linear if "layers.1" in n and "down_proj" in n)
    scoped = with_state_scope(llama_graph, down)
    moved = down.rsplit("/", 1)[0] + f"/{FP32_SCOPE}/MatMul"
    assert moved in graph_layers(scoped).state_fp32
    assert moved not in nodes_to_quantize(scoped, policy_named("linear"))
    # the same node kept by declaring its output as a state output
    output = by_name(llama_graph)[down].output[0]
    assert down in graph_layers(llama_graph, [output]).state_fp32
    assert down not in nodes_to_quantize(llama_graph, policy_named("linear"), [output])
    source, target = tmp_path / "model.onnx", tmp_path / "model.fp16.onnx"
    onnx.save(scoped, str(source))
    fp16_graph(source, target)
    assert set(input_types(onnx.load(str(target)))[moved]) == {TensorProto.FLOAT}
    onnx.save(llama_graph, str(source))
    fp16_graph(source, target, [output])
    assert set(input_types(onnx.load(str(target)))[down]) == {TensorProto.FLOAT}
