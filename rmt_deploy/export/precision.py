"""Reduced-precision graphs made from the validated FP32 graph.

FP16: the matmuls, bias adds, activations (GELU, SwiGLU) and residual adds of every
transformer layer in float16; normalisation (LayerNorm, RMSNorm), the attention scale,
mask add and Softmax, the recurrent state's update, the embeddings, the memory path and
everything outside the layers stay float32, and the graph's inputs and outputs stay
float32 (memory included). The layers and these parts are found from the graph's
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
    """Remove the converter's Cast to float16 whose every reader is a Cast back to
    float32 (it puts such pairs between FP32 nodes, e.g. inside an armt's state write,
    where the FP16 rounding and its 65,504 ceiling turn a running sum into inf, then
    NaN): the float32 readers read the original tensor."""
    from onnx import TensorProto

    def to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None)

    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    dropped = set()
    for cast in [n for n in model.graph.node if n.op_type == "Cast"]:
        back = readers.get(cast.output[0], [])
        if (to(cast) != TensorProto.FLOAT16 or cast.output[0] in outputs or not back
                or any(r.op_type != "Cast" or to(r) != TensorProto.FLOAT
                       or r.output[0] in outputs for r in back)):
            continue
        for reader in back:
            for later in readers.get(reader.output[0], []):
                later.input[:] = [cast.input[0] if i == reader.output[0] else i
                                  for i in later.input]
            dropped.add(id(reader))
        dropped.add(id(cast))
    kept = [n for n in model.graph.node if id(n) not in dropped]
    del model.graph.node[:]
    model.graph.node.extend(kept)


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
