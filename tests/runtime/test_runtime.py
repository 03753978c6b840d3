"""The runtime API against the PyTorch reference loop, across backends and inputs, and
its errors: opening models, damaged exports, API misuse."""

from __future__ import annotations

import io
import json
import math
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from rmt_deploy.errors import BackendError, ConfigError, InputError, ManifestError, RmtError
from rmt_deploy.files import sha256_file
from rmt_deploy.manifest import MANIFEST_NAME
from rmt_deploy.model.checkpoint import load_checkpoint
from rmt_deploy.model.loop import decoder_loss, generate, run_decoder, run_encoder
from rmt_deploy.runtime import DecoderOutput, EncoderOutput, Run, open_model

torch.set_num_threads(1)

# Encoder: segment_size 10, right-aligned; decoder: segment_size 5, left-aligned.
ENCODER_LENGTHS = (1, 7, 10, 20, 23, 34)
DECODER_LENGTHS = (2, 3, 5, 10, 12, 17)


def documents(lengths, low: int, high: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, size=n).tolist() for n in lengths]


ENCODER_DOCS = documents(ENCODER_LENGTHS, 5, 50, seed=1)  # no [PAD]/[CLS]/[SEP], no memory ids
DECODER_DOCS = documents(DECODER_LENGTHS, 0, 59, seed=2)  # no end-of-text


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def encoder_ref(encoder_checkpoint):
    return load_checkpoint(encoder_checkpoint).rmt


@pytest.fixture(scope="module")
def decoder_ref(memory_decoder_checkpoint):
    return load_checkpoint(memory_decoder_checkpoint).rmt


@pytest.fixture(scope="module")
def encoder_onnx(encoder_export):
    return open_model(encoder_export)


@pytest.fixture(scope="module")
def decoder_onnx(memory_decoder_export):
    return open_model(memory_decoder_export)


@pytest.fixture(scope="module")
def encoder_torch(encoder_checkpoint):
    return open_model(encoder_checkpoint)


@pytest.fixture(scope="module")
def decoder_torch(memory_decoder_checkpoint):
    return open_model(memory_decoder_checkpoint)


def reference_perplexity(decoder_ref, doc) -> float:
    ids = torch.tensor([doc])
    with torch.no_grad():
        return math.exp(float(decoder_loss(decoder_ref, ids, ids)))


# -- against the reference ----------------------------------------------------------------


def test_backends_are_what_they_say(encoder_onnx, decoder_onnx, encoder_torch, decoder_torch):
    assert encoder_onnx.backend == decoder_onnx.backend == "onnxruntime"
    assert encoder_torch.backend == decoder_torch.backend == "torch"
    assert encoder_onnx.config.is_encoder and not decoder_onnx.config.is_encoder
    assert encoder_onnx.config == encoder_torch.config
    assert decoder_onnx.config == decoder_torch.config
    np.testing.assert_allclose(encoder_onnx.initial_state["memory_in"],
                               encoder_torch.initial_state["memory_in"])
    np.testing.assert_allclose(decoder_onnx.initial_state["memory_in"],
                               decoder_torch.initial_state["memory_in"])


@pytest.mark.parametrize("model_name", ["encoder_onnx", "encoder_torch"])
def test_encoder_batch_equals_reference(request, model_name, encoder_ref):
    model = request.getfixturevalue(model_name)
    run = model.run(ENCODER_DOCS)
    ref = run_encoder(encoder_ref, ENCODER_DOCS)
    labels = encoder_ref.rmt_config.labels
    assert len(run.outputs) == len(ENCODER_DOCS)
    for row, (output, doc) in enumerate(zip(run.outputs, ENCODER_DOCS, strict=True)):
        assert isinstance(output, EncoderOutput)
        ref_logits = ref.logits[row].detach().numpy()
        np.testing.assert_allclose(output.logits, ref_logits, atol=1e-4, rtol=0)
        np.testing.assert_allclose(output.memory, ref.memory[row].detach().numpy(),
                                   atol=1e-3, rtol=0)
        assert output.label == labels[int(ref_logits.argmax())]
        assert output.segments == ref.segments[row] == -(-len(doc) // 10)
        assert output.tokens == len(doc)
        assert list(output.scores) == list(labels)
        assert math.isclose(sum(output.scores.values()), 1.0, rel_tol=1e-6)
        assert max(output.scores, key=output.scores.get) == output.label
    # the rows really differ: no row got another row's result
    memories = [o.memory for o in run.outputs]
    assert not any(np.allclose(memories[i], memories[j], atol=1e-4)
                   for i in range(len(memories)) for j in range(i))


@pytest.mark.parametrize("model_name", ["encoder_onnx", "encoder_torch"])
def test_encoder_batch_rows_equal_single_runs(request, model_name):
    model = request.getfixturevalue(model_name)
    batch = model.run(ENCODER_DOCS).outputs
    for doc, output in zip(ENCODER_DOCS, batch, strict=True):
        alone = model.run_one(doc)
        np.testing.assert_allclose(output.logits, alone.logits, atol=1e-5, rtol=0)
        np.testing.assert_allclose(output.memory, alone.memory, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_name", ["decoder_onnx", "decoder_torch"])
def test_decoder_batch_equals_reference(request, model_name, decoder_ref):
    model = request.getfixturevalue(model_name)
    run = model.run(DECODER_DOCS)
    ref = run_decoder(decoder_ref, DECODER_DOCS)
    for row, (output, doc) in enumerate(zip(run.outputs, DECODER_DOCS, strict=True)):
        assert isinstance(output, DecoderOutput)
        np.testing.assert_allclose(output.memory, ref.memory[row].detach().numpy(),
                                   atol=1e-3, rtol=0)
        assert output.segments == ref.segments[row] == -(-len(doc) // 5)
        assert output.tokens == len(doc)
        assert output.generated_ids == [] and output.generated is None
        expected = reference_perplexity(decoder_ref, doc)
        assert math.isfinite(expected)
        assert output.perplexity == pytest.approx(expected, rel=1e-4)
        # and by hand from the reference logits: next-token NLL over the whole document
        logits = ref.logits[row].detach().double()
        nll = -torch.log_softmax(logits[:-1], -1)[torch.arange(len(doc) - 1),
                                                  torch.tensor(doc[1:])]
        assert output.perplexity == pytest.approx(math.exp(float(nll.mean())), rel=1e-4)


@pytest.mark.parametrize("model_name", ["decoder_onnx", "decoder_torch"])
def test_decoder_batch_perplexities_equal_single_runs(request, model_name):
    model = request.getfixturevalue(model_name)
    batch = model.run(DECODER_DOCS).outputs
    singles = [model.run_one(doc) for doc in DECODER_DOCS]
    for output, alone in zip(batch, singles, strict=True):
        assert output.perplexity == pytest.approx(alone.perplexity, rel=1e-5)
        np.testing.assert_allclose(output.memory, alone.memory, atol=1e-5, rtol=0)
    assert len({round(o.perplexity, 4) for o in batch}) == len(batch)


def test_decoder_one_token_document_has_no_perplexity(decoder_onnx):
    output = decoder_onnx.run_one([7])
    assert output.perplexity is None
    initial = decoder_onnx.initial_state["memory_in"]
    np.testing.assert_allclose(output.memory.shape, initial.shape)
    assert not np.allclose(output.memory, initial)  # it was written


@pytest.mark.parametrize("model_name", ["decoder_onnx", "decoder_torch"])
@pytest.mark.parametrize(("doc_index", "new_tokens"), [(0, 6), (2, 9), (4, 5), (5, 12)])
def test_generation_equals_reference(request, model_name, decoder_ref,
                                     memory_decoder_checkpoint, doc_index, new_tokens):
    model = request.getfixturevalue(model_name)
    doc = DECODER_DOCS[doc_index]
    expected = generate(decoder_ref, doc, new_tokens)
    output = model.run_one(doc, generate=new_tokens)
    assert output.generated_ids == expected
    assert 1 <= len(expected) <= new_tokens
    tokenizer = Tokenizer.from_str(load_checkpoint(memory_decoder_checkpoint).tokenizer_json)
    assert isinstance(output.generated, str)
    assert output.generated == tokenizer.decode(expected)
    assert output.perplexity is None  # generating computes no segment's token logits


def test_generation_in_a_batch_equals_single_runs(decoder_onnx, decoder_ref):
    outputs = decoder_onnx.run(DECODER_DOCS, generate=7).outputs
    for doc, output in zip(DECODER_DOCS, outputs, strict=True):
        assert output.generated_ids == generate(decoder_ref, doc, 7)


def test_generation_past_the_position_table_is_refused(decoder_onnx):
    with pytest.raises(InputError) as error:
        decoder_onnx.run_one(DECODER_DOCS[3], generate=100)
    assert "at most" in one_line(error)


def test_torch_backend_equals_onnx_backend(encoder_onnx, encoder_torch, decoder_onnx,
                                           decoder_torch):
    for ours, theirs in zip(encoder_onnx.run(ENCODER_DOCS).outputs,
                            encoder_torch.run(ENCODER_DOCS).outputs, strict=True):
        np.testing.assert_allclose(ours.logits, theirs.logits, atol=1e-4, rtol=0)
        np.testing.assert_allclose(ours.memory, theirs.memory, atol=1e-3, rtol=0)
        assert ours.label == theirs.label
        assert (ours.tokens, ours.segments) == (theirs.tokens, theirs.segments)
    for ours, theirs in zip(decoder_onnx.run(DECODER_DOCS, generate=4).outputs,
                            decoder_torch.run(DECODER_DOCS, generate=4).outputs, strict=True):
        np.testing.assert_allclose(ours.memory, theirs.memory, atol=1e-3, rtol=0)
        assert ours.generated_ids == theirs.generated_ids
        assert ours.generated == theirs.generated
    for ours, theirs in zip(decoder_onnx.run(DECODER_DOCS).outputs,
                            decoder_torch.run(DECODER_DOCS).outputs, strict=True):
        assert ours.perplexity == pytest.approx(theirs.perplexity, rel=1e-4)


# -- inputs -------------------------------------------------------------------------------


ENCODER_TEXT = " ".join(f"w{(7 * i) % 45}" for i in range(27)) + "\n"
DECODER_TEXT = "the quick brown fox jumps over the lazy dog\nand then some more words\n"


@pytest.mark.parametrize("model_name, text", [
    ("encoder_onnx", ENCODER_TEXT), ("encoder_torch", ENCODER_TEXT),
    ("decoder_onnx", DECODER_TEXT), ("decoder_torch", DECODER_TEXT),
])
def test_text_file_stream_and_ids_agree(request, model_name, text, tmp_path):
    model = request.getfixturevalue(model_name)
    path = tmp_path / "doc.txt"
    path.write_text(text)
    ids = model.tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > 2 * model.config.segment_size
    forms = [text, path, io.BytesIO(text.encode()), ids, np.asarray(ids, dtype=np.int32)]
    outputs = model.run(forms).outputs + [model.run_one(form) for form in
                                          (text, path, io.BytesIO(text.encode()), ids)]
    first = outputs[0]
    # a batch of 5 against batches of 1, on as many threads as the host's load leaves:
    # another summation order, a few FP32 ulps apart over the segments (2.9e-6 seen)
    for output in outputs:
        assert output.tokens == len(ids) and output.segments == first.segments
        np.testing.assert_allclose(output.memory, first.memory, atol=1e-5, rtol=0)
        if model.config.is_encoder:
            np.testing.assert_allclose(output.logits, first.logits, atol=1e-5, rtol=0)
        else:
            assert output.perplexity == pytest.approx(first.perplexity, rel=1e-5)
    other = model.run_one(ids[:-3])
    assert not np.allclose(other.memory, first.memory, atol=1e-5)


def test_text_with_special_tokens_equals_stripped_ids(encoder_onnx):
    tokenizer = encoder_onnx.tokenizer
    text = "[CLS] " + ENCODER_TEXT + " [SEP] [PAD]"
    ids = tokenizer.encode(ENCODER_TEXT, add_special_tokens=False).ids
    with_specials = encoder_onnx.run_one(text)
    plain = encoder_onnx.run_one(ids)
    padded = encoder_onnx.run_one([2, *ids[:5], 3, 0, *ids[5:], 3])
    assert with_specials.tokens == plain.tokens == padded.tokens == len(ids)
    np.testing.assert_allclose(with_specials.logits, plain.logits, atol=1e-6, rtol=0)
    np.testing.assert_allclose(padded.logits, plain.logits, atol=1e-6, rtol=0)


# -- opening models -----------------------------------------------------------------------


def test_open_by_model_onnx_path(encoder_export, encoder_onnx):
    model = open_model(encoder_export / "model.onnx", threads=1)
    assert model.backend == "onnxruntime"
    assert model.config == encoder_onnx.config
    ours, theirs = model.run_one(ENCODER_DOCS[3]), encoder_onnx.run_one(ENCODER_DOCS[3])
    np.testing.assert_allclose(ours.logits, theirs.logits, atol=1e-6, rtol=0)
    assert open_model(str(encoder_export), backend="onnxruntime").backend == "onnxruntime"


def writable_copy(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    for path in [target, *target.iterdir()]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    return target


def test_open_errors(tmp_path, encoder_export, decoder_export, encoder_checkpoint):
    stray = writable_copy(encoder_export, tmp_path / "stray")
    shutil.copy(stray / "model.onnx", stray / "other.onnx")
    no_manifest = tmp_path / "no-manifest"
    no_manifest.mkdir()
    shutil.copy(encoder_export / "model.onnx", no_manifest / "model.onnx")
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine")
    (stray / "model.plan").write_bytes(b"engine")
    text = tmp_path / "model.txt"
    text.write_text("w1")
    cases = [
        (decoder_export / "prefill.onnx", {}, ManifestError, "not the step graph"),
        (stray / "other.onnx", {}, ManifestError, "not the step graph"),
        (no_manifest, {}, ManifestError, MANIFEST_NAME),
        (no_manifest / "model.onnx", {}, ManifestError, MANIFEST_NAME),
        (plan, {}, ManifestError, MANIFEST_NAME),
        (stray / "model.plan", {}, ManifestError, "not the plan listed"),
        (stray / "model.plan", {"backend": "openvino"}, BackendError, "tensorrt backend"),
        (text, {}, BackendError, "not a model"),
        (tmp_path / "missing", {}, BackendError, "no such file"),
        (tmp_path / "missing.onnx", {}, BackendError, "no such file"),
        (encoder_export, {"backend": "tensorflow"}, ConfigError, "unknown backend"),
        (encoder_export, {"threads": 10**5}, ConfigError, "this host has"),
        (encoder_export, {"precision": "int4"}, ConfigError, "unknown precision"),
        (encoder_export, {"cuda_graphs": True, "backend": "openvino"}, ConfigError,
         "TensorRT feature"),
        (encoder_export, {"colour": "red"}, BackendError, "RuntimeOptions"),
        (encoder_export, {"backend": "torch"}, BackendError, "checkpoint"),
        (encoder_export / "model.onnx", {"backend": "torch"}, BackendError, "checkpoint"),
        (encoder_checkpoint, {"backend": "onnxruntime"}, BackendError, "rmt-export"),
    ]
    for path, options, kind, words in cases:
        with pytest.raises(kind) as error:
            open_model(path, **options)
        assert isinstance(error.value, RmtError)
        message = one_line(error)
        assert words in message, (path, message)


def test_open_errors_say_how_to_fix_in_one_message(tmp_path, encoder_export, monkeypatch):
    with pytest.raises(BackendError) as error:
        open_model(tmp_path / "x.plan")
    assert "x.plan" in one_line(error) and "rmt-export --engine" in one_line(error)
    monkeypatch.setenv("RMT_DEPLOY_MEASURE", "1")  # each measured candidate would fail
    monkeypatch.setenv("RMT_DEPLOY_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(BackendError) as error:
        open_model(encoder_export, precision="int8")
    message = one_line(error)
    assert message.count("no int8 graph") == 1 and "--precision int8" in message, message


def test_modified_graph_fails_the_hash_check(tmp_path, encoder_export):
    folder = writable_copy(encoder_export, tmp_path / "export")
    with open(folder / "model.onnx", "ab") as graph:
        graph.write(b"\0")
    with pytest.raises(ManifestError) as error:
        open_model(folder)
    message = one_line(error)
    assert "sha256" in message and "model.onnx" in message


def test_modified_initial_memory_fails_the_hash_check(tmp_path, decoder_export):
    folder = writable_copy(decoder_export, tmp_path / "export")
    memory = np.load(folder / "memory_in.init.npy")
    np.save(folder / "memory_in.init.npy", memory + 1)
    with pytest.raises(ManifestError) as error:
        open_model(folder)
    assert "sha256" in one_line(error)


def test_corrupt_graph_with_matching_hash_is_a_backend_error(tmp_path, encoder_export):
    folder = writable_copy(encoder_export, tmp_path / "export")
    graph = folder / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:1000] + b"this is not protobuf" * 10)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["graphs"]["step"]["sha256"] = sha256_file(graph)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BackendError) as error:
        open_model(folder)
    message = one_line(error)
    assert "model.onnx" in message and "re-export" in message


@pytest.mark.parametrize("content", ["{not json", "", "\xff\xfe garbage"])
def test_manifest_that_is_not_json(tmp_path, encoder_export, content):
    folder = writable_copy(encoder_export, tmp_path / "export")
    (folder / MANIFEST_NAME).write_text(content, encoding="latin-1")
    with pytest.raises(ManifestError) as error:
        open_model(folder)
    assert MANIFEST_NAME in one_line(error)


def test_manifest_without_graphs(tmp_path, encoder_export):
    folder = writable_copy(encoder_export, tmp_path / "export")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    del manifest["graphs"]
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError) as error:
        open_model(folder)
    one_line(error)


# -- API misuse ---------------------------------------------------------------------------


def test_api_misuse_is_an_input_error(encoder_onnx, decoder_onnx, tmp_path):
    cases = [
        (encoder_onnx, lambda m: m.run("w1 w2 w3"), "list"),
        (encoder_onnx, lambda m: m.run(Path("doc.txt")), "list"),
        (encoder_onnx, lambda m: m.run(np.array([5, 6, 7])), "list"),
        (encoder_onnx, lambda m: m.run(7), "list"),
        (encoder_onnx, lambda m: m.run([]), "no documents"),
        (encoder_onnx, lambda m: m.run([np.zeros((2, 4), dtype=np.int64)]), "1-D"),
        (encoder_onnx, lambda m: m.run([[5, 6, 53]]), "[0, 53)"),
        (encoder_onnx, lambda m: m.run([[5, -1]]), "[0, 53)"),
        (encoder_onnx, lambda m: m.run([[5, 6], [1.5, 2.5]]), "1-D"),
        (encoder_onnx, lambda m: m.run([[5, 6], None]), "1-D"),
        (encoder_onnx, lambda m: m.run([""]), "empty"),
        (encoder_onnx, lambda m: m.run(["w1", "   "]), "empty"),
        (encoder_onnx, lambda m: m.run(["[CLS] [SEP] [PAD]"]), "no tokens"),
        (encoder_onnx, lambda m: m.run([[2, 3, 0, 0]]), "no tokens"),
        (encoder_onnx, lambda m: m.run([[5, 6], []]), "document 1"),
        (encoder_onnx, lambda m: m.run([tmp_path / "missing.txt"]), "no such file"),
        (encoder_onnx, lambda m: m.run([io.BytesIO(b"")]), "empty"),
        (encoder_onnx, lambda m: m.run([[5, 6]], generate=2), "decoder"),
        (encoder_onnx, lambda m: m.run_one([5, 6], generate=1), "decoder"),
        (decoder_onnx, lambda m: m.run([[5, 6]], generate=-1), ">= 0"),
        (decoder_onnx, lambda m: m.run([[5, 60]]), "[0, 60)"),
    ]
    for model, call, words in cases:
        with pytest.raises(InputError) as error:
            call(model)
        message = one_line(error)
        assert words in message, (words, message)


# -- threads, progress, throughput --------------------------------------------------------


def thread_docs(model, job: int) -> list[list[int]]:
    high = 50 if model.config.is_encoder else 59
    rng = np.random.default_rng(1000 + job)
    return [rng.integers(5, high, size=int(n)).tolist() for n in rng.integers(1, 31, size=3)]


def summary(run: Run) -> list[np.ndarray]:
    return [np.concatenate([o.memory.ravel(), np.ravel(
        o.logits if isinstance(o, EncoderOutput) else np.nan if o.perplexity is None
        else o.perplexity)]) for o in run.outputs]


@pytest.mark.parametrize("model_name", ["encoder_onnx", "decoder_onnx", "decoder_torch"])
def test_threads_give_the_sequential_results(request, model_name):
    model = request.getfixturevalue(model_name)
    jobs = range(12)  # 4 threads x 3 runs
    expected = [summary(model.run(thread_docs(model, job))) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda job: summary(model.run(thread_docs(model, job))), jobs))
    for job in jobs:
        for ours, theirs in zip(got[job], expected[job], strict=True):
            np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=1e-6, equal_nan=True)
    assert not np.allclose(expected[0][0], expected[1][0])  # the jobs really differ


@pytest.mark.parametrize(("model_name", "lengths", "total"), [
    ("encoder_onnx", (3, 25, 10), 3),
    ("encoder_onnx", (31, 40), 4),
    ("encoder_torch", (5,), 1),
    ("decoder_onnx", (2, 13, 7), 3),
    ("decoder_torch", (20, 1), 4),
])
def test_progress_is_called_once_per_step(request, model_name, lengths, total):
    model = request.getfixturevalue(model_name)
    calls = []
    docs = [[5 + i % 40 for i in range(n)] for n in lengths]
    model.run(docs, progress=lambda done, all_: calls.append((done, all_)))
    assert calls == [(step, total) for step in range(1, total + 1)]


@pytest.mark.parametrize(("lengths", "total"), [((2, 13, 7), 3), ((4,), 1), ((5, 10), 2)])
def test_progress_while_generating_reaches_the_total(decoder_onnx, lengths, total):
    calls = []
    docs = [[5 + i % 40 for i in range(n)] for n in lengths]
    decoder_onnx.run(docs, generate=2, progress=lambda done, all_: calls.append((done, all_)))
    assert calls == [(step, total) for step in range(1, total + 1)]


@pytest.mark.parametrize("model_name, docs", [
    ("encoder_onnx", ENCODER_DOCS), ("decoder_onnx", DECODER_DOCS),
    ("decoder_torch", DECODER_DOCS[:3]),
])
def test_run_totals_are_consistent(request, model_name, docs):
    model = request.getfixturevalue(model_name)
    run = model.run(docs)
    size = model.config.segment_size
    assert run.tokens == sum(len(doc) for doc in docs) == sum(o.tokens for o in run.outputs)
    assert run.segments == sum(-(-len(doc) // size) for doc in docs)
    assert run.segments == sum(o.segments for o in run.outputs)
    assert run.seconds > 0
    assert run.tokens_per_second == pytest.approx(run.tokens / run.seconds)
    assert run.backend == model.backend and run.precision == "fp32"
    assert Run([], "x", "fp32", 0.0).tokens_per_second == math.inf


def test_errors_name_the_document_at_fault(encoder_export):
    model = open_model(encoder_export)
    with pytest.raises(InputError, match="^document 1: token ids must be a 1-D sequence"):
        model.run([[5, 6, 7], None])
    with pytest.raises(InputError, match="documents must be a list"):
        model.run(b"w1 w2")


def test_mapped_weights_shared_by_every_session_give_the_same_results(memory_decoder_export,
                                                                       monkeypatch):
    from rmt_deploy.runtime.backends import onnxruntime as backend

    expected = open_model(memory_decoder_export).run(DECODER_DOCS, generate=4).outputs
    scored = open_model(memory_decoder_export).run(DECODER_DOCS).outputs
    monkeypatch.setattr(backend, "SHARED_WEIGHTS_BYTES", 0)  # map even this small file
    shared = open_model(memory_decoder_export)
    assert shared.engine._weights  # one OrtValue a tensor, handed to every session
    for got, want in zip(shared.run(DECODER_DOCS, generate=4).outputs, expected, strict=True):
        assert got.generated_ids == want.generated_ids
        np.testing.assert_array_equal(got.memory, want.memory)
    for got, want in zip(shared.run(DECODER_DOCS).outputs, scored, strict=True):
        assert got.perplexity == pytest.approx(want.perplexity, rel=1e-6)


def test_sampling_is_seeded_and_follows_top_k(decoder_onnx):
    from rmt_deploy.runtime.generation import GenerationOptions, TokenChooser

    options = GenerationOptions(8, temperature=1.2, top_k=5, seed=3)
    first = decoder_onnx.run(DECODER_DOCS[:3], generate=options).outputs
    second = decoder_onnx.run(DECODER_DOCS[:3], generate=options).outputs
    assert [o.generated_ids for o in first] == [o.generated_ids for o in second]
    logits = np.random.default_rng(0).normal(size=(64, 60))
    picked = TokenChooser(GenerationOptions(1, temperature=1.0, top_k=3, seed=1))(logits)
    top = np.argsort(-logits, axis=1)[:, :3]
    assert all(token in row for token, row in zip(picked, top, strict=True))
    nucleus = TokenChooser(GenerationOptions(1, temperature=1.0, top_p=1e-9, seed=1))(logits)
    np.testing.assert_array_equal(nucleus, logits.argmax(axis=1))  # p -> 0: the top token
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -2}):
        with pytest.raises(InputError):
            GenerationOptions(4, **bad)
