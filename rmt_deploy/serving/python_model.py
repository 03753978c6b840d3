"""Triton python-backend model of an exported RMT (copied to ``NAME/1/model.py`` by
rmt-triton). It runs rmt-deploy's ONNX Runtime step on the export in ``1/export/`` and
keeps each sequence's state by correlation id. A request carries a chunk of segments
([1, segments, positions]) or, with the request parameter ``generate`` (JSON of
GenerationOptions), a question to answer; a chunk with the request parameter
``question_context`` (true) is a question's context, read as rmt-run --generate reads
it. Decoupled (rmt-triton --decoupled), a
question's tokens are sent as they are made, each a response with ``generated`` [1, 1],
before its final response. Runs inside Triton's python stub only."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from rmt_deploy.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, state_pairs
from rmt_deploy.errors import InputError
from rmt_deploy.manifest import read_manifest
from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine
from rmt_deploy.runtime.generation import GenerationOptions
from rmt_deploy.runtime.options import RuntimeOptions
from rmt_deploy.serving.config import (
    CONTEXT_PARAMETER,
    CORRID,
    END,
    EXPORT_FOLDER,
    GENERATE_PARAMETER,
    GENERATED,
    PRECISION_PARAMETER,
    START,
)
from rmt_deploy.serving.errors import ServingError
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
        self.decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled"))

    def execute(self, requests: list) -> list | None:
        senders = [request.get_response_sender() for request in requests] \
            if self.decoupled else [None] * len(requests)
        parsed = [_step_request(request, self.pairs, sender)
                  for request, sender in zip(requests, senders, strict=True)]
        valid = [request for request in parsed if isinstance(request, StepRequest)]
        done = iter(self.store.execute(valid))
        responses = [_response(request if isinstance(request, ServingError) else next(done),
                               self.pairs) for request in parsed]
        if not self.decoupled:
            return responses
        for sender, response in zip(senders, responses, strict=True):
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def finalize(self) -> None:
        self.store.close()
        self.store = None


def _input(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _step_request(request, pairs, sender=None) -> StepRequest | ServingError:
    state = {pair.name_in: _input(request, pair.name_in) for pair in pairs}
    wanted = request.requested_output_names()
    sequence = int(_input(request, CORRID).reshape(-1)[0])
    try:
        parameters = json.loads(request.parameters() or "{}")
        generate = _generation(parameters)
    except (InputError, TypeError, ValueError) as error:  # TypeError: a value of a wrong type
        return ServingError(f"sequence {sequence}: request parameter {GENERATE_PARAMETER}: "
                            f"{error}")
    question_context = parameters.get(CONTEXT_PARAMETER, False)
    if not isinstance(question_context, bool):
        return ServingError(f"sequence {sequence}: request parameter {CONTEXT_PARAMETER} "
                            f"must be true or false, got {question_context!r}")
    return StepRequest(
        sequence_id=sequence,
        start=bool(_input(request, START).reshape(-1)[0]),
        end=bool(_input(request, END).reshape(-1)[0]),
        input_ids=_input(request, INPUT_IDS)[0],  # the batch axis: one request, one sequence
        attention_mask=_input(request, ATTENTION_MASK)[0],
        state_in={name: value for name, value in state.items() if value is not None} or None,
        wants_state=any(pair.name_out in wanted for pair in pairs),
        wants_logits=LOGITS in wanted,
        generate=generate,
        on_token=None if sender is None or generate is None else _token_sender(sender),
        question_context=question_context,
    )


def _token_sender(sender):
    """Sends each generated token as a response of its own (decoupled mode)."""
    def send(token: int) -> None:
        tensor = pb_utils.Tensor(GENERATED, np.array([[token]], np.int64))
        sender.send(pb_utils.InferenceResponse(output_tensors=[tensor]))
    return send


def _generation(parameters: dict) -> GenerationOptions | None:
    """The request's generation options (the parameter's JSON object), if it has them."""
    value = parameters.get(GENERATE_PARAMETER)
    if value is None:
        return None
    names = [field.name for field in fields(GenerationOptions)]
    expected = f"must be a JSON object of generation options ({', '.join(names)})"
    try:
        options = json.loads(value) if isinstance(value, str) else None
    except ValueError:
        raise ValueError(expected) from None
    if not isinstance(options, dict):
        raise ValueError(expected)
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"unknown option {', '.join(unknown)}; {expected}")
    return GenerationOptions(**options)


def _response(result, pairs):
    if isinstance(result, StepResult):
        tensors = []
        if result.logits is not None:
            tensors.append(pb_utils.Tensor(LOGITS, np.ascontiguousarray(
                result.logits[None], np.float32)))
        if result.generated is not None:
            tensors.append(pb_utils.Tensor(GENERATED, np.asarray([result.generated], np.int64)))
        if result.state is not None:
            tensors += [pb_utils.Tensor(pair.name_out, np.ascontiguousarray(
                result.state[pair.name_in], pair.dtype)) for pair in pairs]
        return pb_utils.InferenceResponse(output_tensors=tensors)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result)))
