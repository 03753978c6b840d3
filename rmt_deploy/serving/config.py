"""config.pbtxt of an exported RMT, built as Triton's own ModelConfig message (from
tritonclient's model_config_pb2), so every field is checked against Triton's schema.

Two kinds of model:

* ``python``: rmt-deploy's runtime in Triton's python backend. The model keeps each
  sequence's state by correlation id (CONTROL_SEQUENCE_START / END / CORRID); a
  request carries a chunk of segments (``input_ids`` / ``attention_mask`` [1, segments,
  positions]), the response returns logits ([1, segments, ...]: a decoder's of every
  segment, an encoder's of the last) and the state after the chunk (every state pair's
  output), and the optional state inputs on a START request restore a saved sequence.
  Decoders also answer a question (one segment, request parameter ``generate``) with
  the ``generated`` ids.
* ``onnxruntime`` / ``tensorrt`` (NGC containers): the step graph with Triton's
  implicit state for every state pair, initialised as the contract declares.
"""

from __future__ import annotations

from dataclasses import dataclass

from rmt_deploy.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    STEP,
    ZEROS,
    StatePair,
    Tensor,
    state_pairs,
)
from rmt_deploy.errors import ConfigError
from rmt_deploy.manifest import Manifest
from rmt_deploy.serving.identity import MODEL_ID_PARAMETER, model_identity

BACKENDS = ("python", "onnxruntime", "tensorrt")
STRATEGIES = ("oldest", "direct")
#: Control inputs of the python-backend model.
START, END, CORRID = "START", "END", "CORRID"
#: The python-backend model's generation: the request parameter holding the options
#: (JSON of GenerationOptions) and the output with the generated ids [1, n].
GENERATE_PARAMETER, GENERATED = "generate", "generated"
#: The request parameter (bool) marking a chunk as the context of a question: read as
#: the authors' ``generate`` reads it (a sliding-window armt without its window).
CONTEXT_PARAMETER = "question_context"
#: Triton data types of the contract's dtypes.
TRITON_TYPES = {"int64": "TYPE_INT64", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}


def initial_state_file(pair: StatePair) -> str:
    """The file in ``NAME/initial_state/`` holding a pair's initial value (raw,
    little-endian, row-major), where it does not start at zero."""
    return f"{pair.name_in}.init"
#: Where the python-backend model finds its export folder, inside the version folder.
EXPORT_FOLDER = "export"
#: The config.pbtxt parameter naming the graphs the python-backend model runs.
PRECISION_PARAMETER = "rmt_precision"


@dataclass(frozen=True)
class ServingOptions:
    """How Triton serves the model."""

    name: str = "rmt"
    backend: str = "python"
    max_batch_size: int = 16  # sequences stepped together in one execution
    idle_seconds: float = 3600.0  # a sequence idle this long is released
    strategy: str = "oldest"
    max_candidate_sequences: int = 1024  # oldest: sequences open at once per instance
    instances: int = 1
    precision: str = "fp32"  # onnxruntime: which of the export's step graphs
    decoupled: bool = False  # python backend: generated tokens are sent as they are made

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown Triton backend {self.backend!r}; choose one of "
                              f"{', '.join(BACKENDS)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown sequence strategy {self.strategy!r}; choose one of "
                              f"{', '.join(STRATEGIES)}")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"model name {self.name!r} is not a folder name; pick e.g. rmt")
        if min(self.max_batch_size, self.max_candidate_sequences, self.instances) < 1:
            raise ConfigError("max batch size, candidate sequences and instances must be >= 1")
        if self.decoupled and self.backend != "python":
            raise ConfigError("--decoupled streams generated tokens, which only the python "
                              "backend serves; drop it or use --backend python")
        if self.idle_seconds <= 0:
            raise ConfigError(f"idle timeout must be positive, got {self.idle_seconds}")


def _pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise ConfigError("tritonclient is not installed: pip install "
                          "'rmt-deploy[serving]'") from None
    return model_config_pb2


def _tensor(pb2, message, spec: Tensor, segments: bool = False) -> None:
    """Name, Triton data type and dims (batch axis dropped, named axes -1) of a tensor;
    ``segments``: with a leading axis of segments (a chunk)."""
    message.name = spec.name
    message.data_type = getattr(pb2, TRITON_TYPES[spec.dtype])
    message.dims.extend([-1] if segments else [])
    message.dims.extend(d if isinstance(d, int) else -1 for d in spec.shape[1:])


def model_config(manifest: Manifest, options: ServingOptions, graph_key: str = STEP):
    """The ModelConfig message of one model; ``graph_key`` names the step graph's
    manifest entry whose tensors it declares."""
    pb2 = _pb2()
    spec = manifest.graphs[graph_key]
    tensors = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    config = pb2.ModelConfig(name=options.name, max_batch_size=options.max_batch_size)
    config.backend = options.backend
    batching = config.sequence_batching
    batching.max_sequence_idle_microseconds = int(options.idle_seconds * 1e6)
    if options.strategy == "oldest":
        batching.oldest.max_candidate_sequences = options.max_candidate_sequences
        batching.oldest.max_queue_delay_microseconds = 1000
    else:
        batching.direct.SetInParent()
    chunks = options.backend == "python"
    for name in (INPUT_IDS, ATTENTION_MASK):
        _tensor(pb2, config.input.add(), tensors[name], chunks)
    _tensor(pb2, config.output.add(), tensors[LOGITS], chunks)
    group = config.instance_group.add(count=options.instances)
    if chunks:
        if not manifest.config.is_encoder:
            config.output.add(name=GENERATED, data_type=pb2.TYPE_INT64, dims=[-1])
        config.model_transaction_policy.decoupled = options.decoupled
        group.kind = pb2.ModelInstanceGroup.KIND_CPU
        for pair in state_pairs(manifest.config):
            state_in = config.input.add()
            _tensor(pb2, state_in, tensors[pair.name_in])
            state_in.optional = True  # only on a START request that restores a sequence
            _tensor(pb2, config.output.add(), tensors[pair.name_out])
        _controls(pb2, batching)
    else:
        for pair in state_pairs(manifest.config):
            _implicit_state(pb2, batching, pair)
    config.parameters[MODEL_ID_PARAMETER].string_value = model_identity(manifest)
    return config


def _controls(pb2, batching) -> None:
    kinds = pb2.ModelSequenceBatching.Control
    for name, kind in ((START, kinds.CONTROL_SEQUENCE_START), (END, kinds.CONTROL_SEQUENCE_END)):
        control = batching.control_input.add(name=name).control.add(kind=kind)
        control.int32_false_true.extend([0, 1])
    batching.control_input.add(name=CORRID).control.add(
        kind=kinds.CONTROL_SEQUENCE_CORRID, data_type=pb2.TYPE_UINT64)


def _implicit_state(pb2, batching, pair: StatePair) -> None:
    """A state pair as Triton-held state, starting from zeros or from its initial value
    in the repository. Its output is not also listed as an output: with batching, the
    onnxruntime backend then fails to split the state tensor."""
    data_type = getattr(pb2, TRITON_TYPES[pair.dtype])
    state = batching.state.add(input_name=pair.name_in, output_name=pair.name_out,
                               data_type=data_type)
    dims = list(pair.row_shape)
    state.dims.extend(dims)
    initial = state.initial_state.add(data_type=data_type, name=f"{pair.name_in}_init")
    if pair.initial == ZEROS:
        initial.zero_data = True
    else:
        initial.data_file = initial_state_file(pair)
    initial.dims.extend(dims)


def config_text(config) -> str:
    """config.pbtxt text of a ModelConfig message."""
    from google.protobuf import text_format

    return text_format.MessageToString(config)
