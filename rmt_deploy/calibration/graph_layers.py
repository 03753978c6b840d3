"""The parts of an exported step graph that reduced precision (FP16, INT8) treats apart,
found from the graph's structure rather than from one base model's layer names, so BERT,
GPT-2 and Llama bases (and ARMT wrappers around them) get the same policy:

- the transformer layers: the repeated, indexed module (``<stack>.<i>``, as torch.onnx
  names a ``ModuleList``'s children) that holds each attention's Softmax;
- each attention's FP32 arithmetic: the element-wise nodes from the scores product
  (QK^T) to the Softmax: scale, mask add, Where;
- normalisation: ``LayerNormalization`` nodes and normalisations computed from a mean
  (RMSNorm: ``x * 1/sqrt(mean(x^2) + eps) * w``; a LayerNorm written out), from the
  statistic to the scaled output;
- the recurrent state's update, which stays FP32: nodes under a module named
  :data:`rmt_deploy.spec.FP32_SCOPE` (e.g. ARMT's outer products and running sums) and
  the nodes that produce a declared state pair's output.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass

from rmt_deploy.spec import FP32_SCOPE

_INDEXED = re.compile(r"^(.+)\.(\d+)$")
#: Element-wise arithmetic between an attention's scores and its Softmax.
_SCORE_OPS = frozenset({"Mul", "Div", "Add", "Sub", "Where"})
#: Element-wise arithmetic a normalisation is computed with.
_NORM_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Pow", "Cast"})


@dataclass(frozen=True)
class GraphLayers:
    """Node names of a step graph by role (see the module docstring)."""

    layer_of: dict[str, int]  # node -> index of the transformer layer it is in
    attention_fp32: frozenset[str]
    normalization: frozenset[str]
    state_fp32: frozenset[str]

    @property
    def fp32(self) -> frozenset[str]:
        """Nodes every reduced-precision graph computes in FP32 inside the layers."""
        return self.attention_fp32 | self.normalization | self.state_fp32


def graph_layers(model, state_outputs: Collection[str] = ()) -> GraphLayers:
    """The roles of the ONNX ``model``'s nodes; ``state_outputs`` names the graph outputs
    that are declared state (kept FP32 with the nodes that make them)."""
    nodes = list(model.graph.node)
    producer = {output: node for node in nodes for output in node.output}
    consumers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    layer_of = _layers(nodes)
    attention = set()
    for softmax in (n for n in nodes if n.op_type == "Softmax" and n.name in layer_of):
        attention.add(softmax.name)
        attention |= _scores_arithmetic(softmax, producer, layer_of)
    weights = _constants(model)
    normalization = {n.name for n in nodes if n.op_type == "LayerNormalization"}
    for mean in (n for n in nodes if n.op_type == "ReduceMean"):
        normalization |= _mean_normalization(mean, producer, consumers, weights)
    state = {n.name for n in nodes if _in_fp32_scope(n.name)}
    state |= {producer[name].name for name in state_outputs if name in producer}
    return GraphLayers(layer_of, frozenset(attention), frozenset(normalization),
                       frozenset(state))


def _in_fp32_scope(name: str) -> bool:
    """Whether a node sits under a module whose name starts with FP32_SCOPE (torch.onnx
    scopes nodes by module, ``/fp32_state_write/MatMul``, ``/fp32_state_write_1/...``)."""
    return any(part.startswith(FP32_SCOPE) for part in name.split("/")[:-1])


def _constants(model) -> set[str]:
    """Names of the graph's constant tensors: initializers, Constant outputs and their
    Identity copies (torch.onnx shares equal weights through Identity nodes)."""
    constants = {tensor.name for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" or (node.op_type == "Identity"
                                          and node.input[0] in constants):
            constants.update(node.output)
    return constants


def _layers(nodes: list) -> dict[str, int]:
    """Node -> layer index, for the indexed module stack holding the most Softmax nodes."""
    stacks = Counter(_outer_index(n.name) for n in nodes if n.op_type == "Softmax")
    stacks.pop(None, None)
    if not stacks:
        return {}
    stack = stacks.most_common(1)[0][0][0]
    layer_of = {}
    for node in nodes:
        scope = _outer_index(node.name)
        if scope is not None and scope[0] == stack:
            layer_of[node.name] = scope[1]
    return layer_of


def _outer_index(name: str) -> tuple[str, int] | None:
    """(stack path, index) of the outermost indexed module in a node's name."""
    parts = name.split("/")
    for depth, part in enumerate(parts[:-1]):
        match = _INDEXED.match(part)
        if match:
            return "/".join([*parts[:depth], match.group(1)]), int(match.group(2))
    return None


def _scores_arithmetic(softmax, producer: dict, layer_of: dict[str, int]) -> set[str]:
    """The element-wise nodes of the softmax's layer between the scores and it."""
    found, stack = set(), [softmax.input[0]]
    while stack:
        node = producer.get(stack.pop())
        if (node is None or node.name in found or node.op_type not in _SCORE_OPS
                or layer_of.get(node.name) != layer_of[softmax.name]):
            continue
        found.add(node.name)
        stack.extend(node.input)
    return found


def _mean_normalization(mean, producer: dict, consumers: dict, weights: set[str]) -> set[str]:
    """The nodes of a normalisation whose statistic is ``mean``: the square (and the
    centring) before it, and the arithmetic after it up to the input scaled by it and
    the weight and bias applied to that; empty if ``mean`` is not such a statistic."""
    square = producer.get(mean.input[0])
    if square is None or not _is_square(square):
        return set()
    source = square.input[0]  # x, or x - mean(x)
    found = {mean.name, square.name}
    centred = producer.get(source)
    if centred is not None and centred.op_type == "Sub":
        found |= {centred.name} | {producer[n].name for n in centred.input
                                   if n in producer and producer[n].op_type == "ReduceMean"}
        inputs = {source, *centred.input}
    else:
        inputs = {source}
    frontier, scaled = [mean.output[0]], None
    while frontier and scaled is None:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type not in _NORM_OPS or node.name in found:
                continue
            found.add(node.name)
            if inputs & set(node.input):
                scaled = node
                break
            frontier.extend(node.output)
    if scaled is None:
        return set()
    applied = 0
    while applied < 2:  # the weight, then the bias, and the casts between them
        following = consumers.get(scaled.output[0], [])
        if len(following) != 1 or not (following[0].op_type == "Cast" or (
                following[0].op_type in ("Mul", "Add") and weights & set(following[0].input))):
            break
        scaled = following[0]
        applied += scaled.op_type != "Cast"
        found.add(scaled.name)
    return found


def _is_square(node) -> bool:
    return (node.op_type == "Pow" or (node.op_type == "Mul" and len(set(node.input)) == 1))
