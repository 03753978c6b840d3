"""INT8 graphs with explicit Q/DQ nodes, made by ONNX Runtime's static quantization from
the FP32 graph and the recorded calibration steps.

Activations and weights are signed INT8 with zero point 0 (symmetric), weights per
output channel: the form TensorRT's explicit quantization consumes, and one ONNX
Runtime and OpenVINO run on CPU. Ranges come from the recorded calibration steps.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path

from rmt_deploy.calibration.collect import CalibrationSteps
from rmt_deploy.calibration.policies import Policy, nodes_to_quantize


def prepare(source: Path, target: Path) -> None:
    """ONNX Runtime's pre-quantization pass (graph optimisation and shape inference) on
    the graph ``source`` and its weights (an export's weights file)."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(onnx.load(str(source)), str(target), skip_symbolic_shape=True)


METHODS = ("minmax", "percentile")  # activation ranges: extremes, or 99.999th percentile


def int8_graph(prepared: Path, target: Path, steps: CalibrationSteps, policy: Policy,
               method: str = "minmax", state_outputs: Collection[str] = ()) -> None:
    """Write the Q/DQ INT8 graph of ``prepared`` under ``policy``, with activation ranges
    from the recorded steps' extremes (``minmax``) or their 99.999th percentile
    (``percentile``: outliers clipped); the nodes making ``state_outputs`` stay FP32."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = steps.feeds()

        def get_next(self):
            return next(self._feeds, None)

    nodes = nodes_to_quantize(onnx.load(str(prepared), load_external_data=False), policy,
                              state_outputs)
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # per-tensor notes on LayerNorm weights
    try:
        quantize_static(
            str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
            calibrate_method={"minmax": CalibrationMethod.MinMax,
                              "percentile": CalibrationMethod.Percentile}[method],
            nodes_to_quantize=nodes,
            op_types_to_quantize=None if policy.everything else ["MatMul", "Gemm"],
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    finally:
        logging.getLogger().setLevel(quiet)
