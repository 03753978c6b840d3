"""rmt-triton's model repositories (config.pbtxt parsed with Triton's own schema) and the
python-backend model's sequence store, without a server."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("tritonclient.grpc")

from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2 as pb2  # noqa: E402

from rmt_deploy.contract import STEP  # noqa: E402
from rmt_deploy.manifest import read_manifest  # noqa: E402
from rmt_deploy.runtime import open_model  # noqa: E402
from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine  # noqa: E402
from rmt_deploy.runtime.options import RuntimeOptions  # noqa: E402
from rmt_deploy.segmentation import content_id_range, segment_bounds, step_inputs  # noqa: E402
from rmt_deploy.serving.cli import triton_main  # noqa: E402
from rmt_deploy.serving.errors import ServingError, StateFileError  # noqa: E402
from rmt_deploy.serving.identity import model_identity  # noqa: E402
from rmt_deploy.serving.progress import Progress, load_progress, save_progress  # noqa: E402
from rmt_deploy.serving.repository import PYTHON_MODEL  # noqa: E402
from rmt_deploy.serving.sequences import SequenceStore, StepRequest, StepResult  # noqa: E402

TYPES = {"int64": pb2.TYPE_INT64, "float32": pb2.TYPE_FP32}


def rmt_triton(*args):
    return CliRunner().invoke(triton_main, [str(a) for a in args])


def read_config(folder) -> pb2.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), pb2.ModelConfig())


def declared(tensors) -> dict:
    return {t.name: (t.data_type, list(t.dims)) for t in tensors}


def expected(specs, names) -> dict:
    return {s.name: (TYPES[s.dtype], [d if isinstance(d, int) else -1 for d in s.shape[1:]])
            for s in specs if s.name in names}


def chunked(tensors: dict, names: set) -> dict:
    """``tensors`` with a leading axis of segments on those in ``names``."""
    return {name: (kind, [-1, *dims] if name in names else dims)
            for name, (kind, dims) in tensors.items()}


@pytest.mark.parametrize("export_fixture", ["encoder_export", "decoder_export",
                                            "llama_rmt_export"])
def test_python_backend_repository(export_fixture, request, tmp_path):
    export = request.getfixturevalue(export_fixture)
    result = rmt_triton(tmp_path / "repo", "--model", export, "--name", "m", "--max-batch-size", 4)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "repo" / "m"
    config, manifest = read_config(folder), read_manifest(export)
    graph = manifest.graphs[STEP]
    assert (config.name, config.backend, config.max_batch_size) == ("m", "python", 4)
    chunk = {"input_ids", "attention_mask", "logits"}  # a request carries [segments, ...]
    assert declared(config.input) == chunked(expected(graph.inputs, {
        "input_ids", "attention_mask", "memory_in"}), chunk)
    assert [t.name for t in config.input if t.optional] == ["memory_in"]
    generated = {} if manifest.config.is_encoder else {"generated": (TYPES["int64"], [-1])}
    assert declared(config.output) == chunked(expected(graph.outputs, {
        "logits", "memory_out"}), chunk) | generated
    controls = {c.name: c.control[0] for c in config.sequence_batching.control_input}
    kinds = pb2.ModelSequenceBatching.Control
    assert {name: c.kind for name, c in controls.items()} == {
        "START": kinds.CONTROL_SEQUENCE_START, "END": kinds.CONTROL_SEQUENCE_END,
        "CORRID": kinds.CONTROL_SEQUENCE_CORRID}
    assert controls["CORRID"].data_type == pb2.TYPE_UINT64
    assert config.sequence_batching.max_sequence_idle_microseconds == 3600 * 10**6
    assert config.sequence_batching.HasField("oldest")
    assert not config.sequence_batching.state  # python backend: implicit state is not honoured
    assert config.parameters["rmt_model_id"].string_value == model_identity(manifest)
    assert (folder / "1" / "model.py").read_text() == PYTHON_MODEL.read_text()
    assert read_manifest(folder / "1" / "export").graphs[STEP].sha256 == graph.sha256
    assert not config.model_transaction_policy.decoupled
    result = rmt_triton(tmp_path / "repo", "--model", export, "--name", "s", "--decoupled")
    assert result.exit_code == 0, result.output
    assert read_config(tmp_path / "repo" / "s").model_transaction_policy.decoupled


@pytest.mark.parametrize("export_fixture", ["encoder_export", "decoder_export",
                                            "llama_rmt_export"])
def test_onnxruntime_repository_initial_state(export_fixture, request, tmp_path):
    export = request.getfixturevalue(export_fixture)
    result = rmt_triton(tmp_path, "--model", export, "--backend", "onnxruntime",
                        "--strategy", "direct", "--idle-seconds", 90)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "rmt"
    config, manifest = read_config(folder), read_manifest(export)
    graph = manifest.graphs[STEP]
    m, h = manifest.config.num_mem_tokens, manifest.config.hidden_size
    assert config.backend == "onnxruntime"
    assert declared(config.input) == expected(graph.inputs, {"input_ids", "attention_mask"})
    assert declared(config.output) == expected(graph.outputs, {"logits"})  # no memory_out
    batching = config.sequence_batching
    assert batching.HasField("direct") and not batching.control_input
    assert batching.max_sequence_idle_microseconds == 90 * 10**6
    (state,) = batching.state
    assert (state.input_name, state.output_name, state.data_type, list(state.dims)) == (
        "memory_in", "memory_out", pb2.TYPE_FP32, [m, h])
    (initial,) = state.initial_state
    assert (initial.data_type, list(initial.dims), initial.WhichOneof("state_data")) == (
        pb2.TYPE_FP32, [m, h], "data_file")
    # Triton reads data_file from the model folder's initial_state/ (kInitialStateFolder).
    data = (folder / "initial_state" / initial.data_file).read_bytes()
    assert len(data) == m * h * 4
    learned = np.load(export / "memory_in.init.npy")
    assert np.array_equal(np.frombuffer(data, "<f4").reshape(m, h), learned)
    assert not np.allclose(learned, 0)
    assert (folder / "1" / "model.onnx").read_bytes() == (export / graph.file).read_bytes()
    assert (folder / "1" / "weights.data").read_bytes() == (export / "weights.data").read_bytes()


def test_repository_errors_are_one_line_and_leave_nothing(encoder_export, tmp_path):
    result = rmt_triton(tmp_path, "--model", encoder_export, "--backend", "tensorrt")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "rmt-triton: error: this export has no TensorRT plan; build one with rmt-export "
        "--engine on the GPU that will serve it"]
    result = rmt_triton(tmp_path, "--model", tmp_path / "nowhere")
    assert result.exit_code == 1 and "no rmt.json there" in result.stderr
    result = rmt_triton(tmp_path, "--model", encoder_export, "--precision", "fp16")
    assert result.exit_code == 1 and "no fp16 step graph" in result.stderr
    result = rmt_triton(tmp_path, "--model", encoder_export, "--backend", "onnxruntime",
                        "--decoupled")
    assert result.exit_code == 1 and "only the python backend" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_rewrite_replaces_only_its_model(encoder_export, decoder_export, tmp_path):
    assert rmt_triton(tmp_path, "--model", encoder_export, "--name", "a").exit_code == 0
    assert rmt_triton(tmp_path, "--model", decoder_export, "--name", "b").exit_code == 0
    assert rmt_triton(tmp_path, "--model", decoder_export, "--name", "a").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert read_config(tmp_path / "a").output[0].dims[-1] == read_manifest(
        decoder_export).config.vocab_size


def test_a_folder_rmt_triton_did_not_write_is_never_replaced(encoder_export, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    assert rmt_triton(tmp_path, "--model", encoder_export, "--name", "m").exit_code == 0
    (tmp_path / "m" / "1" / "mine.txt").write_text("keep me too")
    for name, words in (("notes", "is not a model folder written by rmt-triton"),
                        ("m", "holds 1/mine.txt, which rmt-triton did not write")):
        result = rmt_triton(tmp_path, "--model", encoder_export, "--name", name)
        assert result.exit_code == 1 and words in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert (tmp_path / "m" / "1" / "mine.txt").read_text() == "keep me too"


# The sequence store, driven directly.

def segments_of(ids, config):
    for start, end in segment_bounds(len(ids), config):
        yield step_inputs([np.asarray(ids[start:end])], config)


@pytest.fixture(scope="module")
def store_parts(encoder_export):
    manifest = read_manifest(encoder_export)
    return (OnnxRuntimeEngine(manifest, RuntimeOptions(threads=1)),
            manifest.load_initial_state())


def documents(config, lengths, seed):
    low, high = content_id_range(config)
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, size=n).tolist() for n in lengths]


def test_store_interleaves_sequences_like_local_runs(store_parts, encoder_export):
    engine, initial = store_parts
    store = SequenceStore(engine, initial, idle_seconds=60)
    docs = documents(engine.config, (7, 31, 55), seed=3)
    pending = {seq: list(segments_of(doc, engine.config))
               for seq, doc in zip((5, 9, 11), docs, strict=True)}
    sent = dict.fromkeys(pending, 0)
    last = {}
    while pending:  # one segment of every open sequence per batch
        batch = []
        for seq, segs in pending.items():
            ids, mask = segs[sent[seq]]
            batch.append(StepRequest(seq, sent[seq] == 0, sent[seq] == len(segs) - 1, ids, mask))
        for request, result in zip(batch, store.execute(batch), strict=True):
            assert isinstance(result, StepResult)
            last[request.sequence_id] = result
            sent[request.sequence_id] += 1
        pending = {s: v for s, v in pending.items() if sent[s] < len(v)}
    assert len(store) == 0  # every sequence ended
    local = open_model(encoder_export).run(docs).outputs
    for seq, output in zip((5, 9, 11), local, strict=True):
        np.testing.assert_allclose(last[seq].logits[0], output.logits, atol=1e-5)
        np.testing.assert_allclose(last[seq].state["memory_in"][0], output.memory, atol=1e-5)


def test_store_rejects_bad_requests_without_disturbing_others(store_parts):
    engine, initial = store_parts
    config = engine.config
    store = SequenceStore(engine, initial, idle_seconds=60)
    (ids, mask), = list(segments_of(documents(config, (5,), seed=4)[0], config))
    m, h = config.num_mem_tokens, config.hidden_size
    assert isinstance(store.execute([StepRequest(1, True, False, ids, mask)])[0], StepResult)
    before = store.stepper.state(1)["memory_in"]
    bad = [
        StepRequest(2, False, False, ids, mask),  # never started
        StepRequest(3, False, False, ids, mask, {"memory_in": np.zeros((1, m, h), np.float32)}),
        StepRequest(4, True, False, ids, mask, {"memory_in": np.zeros((1, m + 1, h),
                                                                       np.float32)}),
        StepRequest(5, True, False, ids, mask, {"memory_in": np.full((1, m, h), np.nan,
                                                                      np.float32)}),
        StepRequest(6, True, False, ids[:, :-1], mask[:, :-1]),
        StepRequest(7, True, False, ids + config.vocab_size, mask),
        StepRequest(1, False, False, ids, mask),  # the good one, after the bad ones
    ]
    results = store.execute(bad)
    messages = [str(r) for r in results[:-1]]
    assert "sequence 2 is not open on this server" in messages[0]
    assert "only allowed on its START request" in messages[1]
    assert "is from another model" in messages[2]
    assert "NaN" in messages[3]
    assert "input_ids has shape" in messages[4]
    assert "token ids must lie in" in messages[5]
    assert all(isinstance(r, ServingError) for r in results[:-1])
    assert isinstance(results[-1], StepResult) and len(store) == 1
    with engine.new_state({"memory_in": before[None]}) as state:
        state.step(ids, mask)
        np.testing.assert_allclose(store.stepper.state(1)["memory_in"],
                                   state.state()["memory_in"][0], atol=1e-6)


def test_store_forgets_idle_sequences(store_parts):
    engine, initial = store_parts
    now = [0.0]
    store = SequenceStore(engine, initial, idle_seconds=10, clock=lambda: now[0])
    (ids, mask), = list(segments_of(documents(engine.config, (5,), seed=5)[0], engine.config))
    store.execute([StepRequest(1, True, False, ids, mask)])
    now[0] = 11.0
    (result,) = store.execute([StepRequest(1, False, False, ids, mask)])
    assert isinstance(result, ServingError) and "idle over 10 s" in str(result)
    assert len(store) == 0


def test_progress_is_saved_in_the_runtime_state_container(encoder_export, tmp_path):
    """The client's progress file is the sessions' sealed container, with every state
    pair; a truncated or foreign one is refused."""
    manifest = read_manifest(encoder_export)
    state = {k: v + 1 for k, v in manifest.load_initial_state().items()}
    path = tmp_path / "progress"
    saved = Progress(model_identity(manifest), "d" * 64, 40, 3, state,
                     np.arange(3, dtype=np.float32), 1.5, 7)
    save_progress(path, saved)
    assert path.read_bytes().startswith(b"RMTSTATE1")
    loaded = load_progress(path, manifest.config)
    np.testing.assert_array_equal(loaded.state["memory_in"], state["memory_in"])
    assert (loaded.model_id, loaded.tokens, loaded.next_segment, loaded.count) == (
        saved.model_id, 40, 3, 7)
    save_progress(path, Progress(saved.model_id, "d" * 64, 40, 3,
                                 {"memory_in": state["memory_in"][:, :4]}, saved.logits))
    with pytest.raises(StateFileError, match="memory_in .* another model"):
        load_progress(path, manifest.config)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(StateFileError, match="damaged or truncated"):
        load_progress(path, manifest.config)


def test_a_chunk_that_reads_no_logits_computes_none(store_parts, encoder_export):
    """An encoder's chunks before the last ask for no logits: the store runs them on the
    graph without logits and returns none; the last chunk's equal rmt-run's."""
    engine, initial = store_parts
    store = SequenceStore(engine, initial, idle_seconds=60)
    (doc,) = documents(engine.config, (200,), seed=6)
    parts = list(segments_of(doc, engine.config))
    chunks = [parts[:4], parts[4:]]
    results = []
    for number, chunk in enumerate(chunks):
        ids = np.concatenate([ids for ids, _ in chunk])
        mask = np.concatenate([mask for _, mask in chunk])
        last = number == len(chunks) - 1
        results += store.execute([StepRequest(1, number == 0, last, ids, mask,
                                              wants_logits=last)])
    assert results[0].logits is None
    assert store.stepper.seen(True)[0] == 0  # one step with logits (the first is not counted)
    local = open_model(encoder_export).run_one(doc)
    np.testing.assert_allclose(results[1].logits[0], local.logits, atol=1e-5)
