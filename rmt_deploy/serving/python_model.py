"""Triton python-backend model of an exported RMT (copied to ``NAME/1/model.py`` by
rmt-triton). It runs rmt-deploy's ONNX Runtime step on the export in ``1/export/`` and
keeps each sequence's memory by correlation id. Runs inside Triton's python stub only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from rmt_deploy.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, MEMORY_IN, MEMORY_OUT
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
        self.store = SequenceStore(engine, manifest.load_initial_memory(), idle)

    def execute(self, requests: list) -> list:
        results = self.store.execute([_step_request(request) for request in requests])
        return [_response(result) for result in results]

    def finalize(self) -> None:
        self.store.close()
        self.store = None


def _input(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _step_request(request) -> StepRequest:
    return StepRequest(
        sequence_id=int(_input(request, CORRID).reshape(-1)[0]),
        start=bool(_input(request, START).reshape(-1)[0]),
        end=bool(_input(request, END).reshape(-1)[0]),
        input_ids=_input(request, INPUT_IDS),
        attention_mask=_input(request, ATTENTION_MASK),
        memory_in=_input(request, MEMORY_IN),
        wants_memory=MEMORY_OUT in request.requested_output_names(),
    )


def _response(result):
    if isinstance(result, StepResult):
        tensors = [pb_utils.Tensor(LOGITS, np.ascontiguousarray(result.logits, np.float32))]
        if result.memory is not None:
            tensors.append(pb_utils.Tensor(MEMORY_OUT,
                                           np.ascontiguousarray(result.memory, np.float32)))
        return pb_utils.InferenceResponse(output_tensors=tensors)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result)))
