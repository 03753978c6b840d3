"""Reduced-precision graphs made from the validated FP32 graph.

FP16: the matmuls, bias adds, activations (GELU, SwiGLU) and residual adds of every
transformer layer in float16; normalisation (LayerNorm, RMSNorm), the attention scale,
mask add and Softmax, the recurrent state's update, the embeddings, the memory path and
everything outside the layers stay float32, and the graph's inputs and outputs stay
float32 (memory included), and no tensor between two float32 nodes is rounded to float16
on the way. The layers and these parts are found from the graph's
structure (:mod:`rmt_deploy.calibration.graph_layers`), so any base gets this policy.
TensorRT 10/11 builds such a strongly typed graph as it is; CPU runtimes run it with
FP16 weights.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np

from rmt_deploy.calibration.graph_layers import graph_layers
from rmt_deploy.errors import ValidationError

_FP32_OPS = ["LayerNormalization", "Softmax"]


def fp16_graph(source: Path, target: Path, state_outputs: Collection[str] = ()) -> None:
    """Write the mixed-precision FP16 version of the FP32 graph ``source``; the nodes
    making ``state_outputs`` (declared state) stay FP32."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(source))
    layers = graph_layers(model, state_outputs)
    keep_fp32 = [node.name for node in model.graph.node
                 if node.name not in layers.layer_of or node.name in layers.fp32]
    converted = convert_float_to_float16(
        model, keep_io_types=True, node_block_list=keep_fp32,
        op_block_list=list(DEFAULT_OP_BLOCK_LIST) + _FP32_OPS)
    _drop_round_trips(converted)
    wrapper = OnnxModel(converted)
    wrapper.topological_sort()  # the converter appends its Cast nodes at the end
    _check_fp16(wrapper.model, target.name)
    onnx.save(wrapper.model, str(target))


def _drop_round_trips(model) -> None:
    """Remove the converter's FP32 -> FP16 -> FP32 Cast pairs: it wraps every kept node
    in Casts, so a tensor passing between two FP32 nodes (or from a graph input into one)
    would be rounded to FP16 on the way, and a running sum such as an ARMT's state would
    overflow at 65,504. The FP32 consumers read the FP32 tensor instead."""
    from onnx import TensorProto

    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) \
            if node.op_type == "Cast" else None

    producer = {output: node for node in model.graph.node for output in node.output}
    float_tensors = {t.name for t in [*model.graph.input, *model.graph.value_info]
                     if t.type.tensor_type.elem_type == TensorProto.FLOAT}
    float_tensors |= {node.output[0] for node in model.graph.node
                      if cast_to(node) == TensorProto.FLOAT}
    replaced = {}
    for node in model.graph.node:
        half = producer.get(node.input[0]) if cast_to(node) == TensorProto.FLOAT else None
        if half is not None and cast_to(half) == TensorProto.FLOAT16 \
                and half.input[0] in float_tensors:
            replaced[node.output[0]] = half.input[0]
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name in replaced:
                node.input[index] = replaced[name]
    graph_outputs = {o.name for o in model.graph.output}
    while True:  # drop the Casts nothing reads any more
        read = {name for node in model.graph.node for name in node.input} | graph_outputs
        dead = [node for node in model.graph.node
                if node.op_type == "Cast" and not set(node.output) & read]
        if not dead:
            return
        for node in dead:
            model.graph.node.remove(node)


def _check_fp16(model, name: str) -> None:
    from onnx import TensorProto, numpy_helper

    halves = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16]
    if not halves:
        raise ValidationError(f"{name}: no weight was converted to FP16; the model's layers "
                              "were not recognised (a stack of indexed modules, each with an "
                              "attention Softmax, expected)")
    for tensor in halves:
        if not np.isfinite(numpy_helper.to_array(tensor)).all():
            raise ValidationError(f"{name}: FP16 constant {tensor.name} overflows; keep its "
                                  "node in FP32")
    outputs = [o for o in model.graph.output if o.type.tensor_type.elem_type != TensorProto.FLOAT]
    if outputs:
        raise ValidationError(f"{name}: output {outputs[0].name} is not float32")
