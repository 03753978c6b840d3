"""Triton python-backend model of an exported RMT (copied to ``NAME/1/model.py`` by
rmt-triton). It runs rmt-deploy's ONNX Runtime step on the export in ``1/export/`` and
keeps each sequence's state by correlation id. Runs inside Triton's python stub only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from rmt_deploy.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, state_pairs
from rmt_deploy.manifest import read_manifest
from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine
from rmt_deploy.runtime.options import RuntimeOptions
from rmt_deploy.serving.config import CORRID, END, EXPORT_FOLDER, PRECISION_PARAMETER, START
from rmt_deploy.serving.sequences import SequenceStore, StepRequest, StepResult


class TritonPythonModel:
    """Triton's entry points: initialize, execute, finalize."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"] / EXPORT_FOLDER
        precision = config.get("parameters", {}).get(PRECISION_PARAMETER, {}).get(
            "string_value", "fp32")
        idle = int(config["sequence_batching"]["max_sequence_idle_microseconds"]) / 1e6
        manifest = read_manifest(folder)
        engine = OnnxRuntimeEngine(manifest, RuntimeOptions(precision=precision), device="cpu")
        self.store = SequenceStore(engine, manifest.load_initial_state(), idle)
        self.pairs = state_pairs(manifest.config)

    def execute(self, requests: list) -> list:
        results = self.store.execute([_step_request(request, self.pairs)
                                      for request in requests])
        return [_response(result, self.pairs) for result in results]

    def finalize(self) -> None:
        self.store.close()
        self.store = None


def _input(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _step_request(request, pairs) -> StepRequest:
    state = {pair.name_in: _input(request, pair.name_in) for pair in pairs}
    wanted = request.requested_output_names()
    return StepRequest(
        sequence_id=int(_input(request, CORRID).reshape(-1)[0]),
        start=bool(_input(request, START).reshape(-1)[0]),
        end=bool(_input(request, END).reshape(-1)[0]),
        input_ids=_input(request, INPUT_IDS),
        attention_mask=_input(request, ATTENTION_MASK),
        state_in={name: value for name, value in state.items() if value is not None} or None,
        wants_state=any(pair.name_out in wanted for pair in pairs),
    )


def _response(result, pairs):
    if isinstance(result, StepResult):
        tensors = [pb_utils.Tensor(LOGITS, np.ascontiguousarray(result.logits, np.float32))]
        if result.state is not None:
            tensors += [pb_utils.Tensor(pair.name_out, np.ascontiguousarray(
                result.state[pair.name_in], pair.dtype)) for pair in pairs]
        return pb_utils.InferenceResponse(output_tensors=tensors)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result)))
