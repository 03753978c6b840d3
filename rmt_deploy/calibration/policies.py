"""Quantization policies: which nodes of the step graph run in INT8.

The memory path (memory in, the embeddings it joins, the slice that becomes memory out),
LayerNormalization, Softmax, residual adds, the recurrent state's update and the output
head stay in FP32 in every policy but ``naive``; the policies differ in which matrix
multiplications of the transformer layers are quantized. They are listed from the most
to the least quantized. The layers are found from the graph's structure
(:mod:`rmt_deploy.calibration.graph_layers`), so any base gets these policies.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from rmt_deploy.calibration.graph_layers import graph_layers
from rmt_deploy.errors import ConfigError

MATMULS = ("MatMul", "Gemm")


@dataclass(frozen=True)
class Policy:
    name: str
    description: str
    attention_matmuls: bool  # activation x activation products (scores, weighted values)
    skip_edge_layers: bool  # keep the first and the last layer in FP32
    everything: bool = False  # every operator ONNX Runtime can quantize (the naive baseline)


POLICIES = (
    Policy("naive", "every operator ONNX Runtime quantizes, memory path included",
           attention_matmuls=True, skip_edge_layers=False, everything=True),
    Policy("matmul", "all matmuls of the layers (weights and attention) in INT8",
           attention_matmuls=True, skip_edge_layers=False),
    Policy("linear", "the layers' weight matmuls in INT8; attention products in FP32",
           attention_matmuls=False, skip_edge_layers=False),
    Policy("linear-inner", "weight matmuls of the inner layers in INT8; first and last "
           "layer in FP32", attention_matmuls=False, skip_edge_layers=True),
)
POLICY_NAMES = tuple(policy.name for policy in POLICIES)


def policy_named(name: str) -> Policy:
    for policy in POLICIES:
        if policy.name == name:
            return policy
    raise ConfigError(f"unknown INT8 policy {name!r}; use one of {', '.join(POLICY_NAMES)} "
                      "or auto")


def nodes_to_quantize(model, policy: Policy,
                      state_outputs: Collection[str] = ()) -> list[str] | None:
    """Names of the nodes ``policy`` quantizes in the ONNX ``model`` (None: all); the
    nodes making ``state_outputs`` (declared state) are never quantized."""
    if policy.everything:
        return None
    weights = {tensor.name for tensor in model.graph.initializer} | {
        output for node in model.graph.node if node.op_type == "Constant"
        for output in node.output}
    roles = graph_layers(model, state_outputs)
    layers = set(roles.layer_of.values())
    if not layers:
        raise ConfigError("the graph's transformer layers were not recognised (a stack of "
                          "indexed modules, each with an attention Softmax, expected); "
                          "INT8 needs them")
    edge = {min(layers), max(layers)} if policy.skip_edge_layers else set()
    chosen = []
    for node in model.graph.node:
        layer = roles.layer_of.get(node.name)
        if (node.op_type not in MATMULS or layer is None or layer in edge
                or node.name in roles.state_fp32):
            continue
        is_linear = any(name in weights for name in node.input)
        if is_linear or policy.attention_matmuls:
            chosen.append(node.name)
    if not chosen:
        raise ConfigError(f"INT8 policy {policy.name} quantizes nothing in this "
                          f"{len(layers)}-layer model; choose another --int8-policy")
    return chosen


def applicable_policies(model, state_outputs: Collection[str] = ()) -> list[Policy]:
    """The policies that quantize something in ``model``."""
    applicable = []
    for policy in POLICIES:
        try:
            nodes_to_quantize(model, policy, state_outputs)
        except ConfigError:
            continue
        applicable.append(policy)
    return applicable
