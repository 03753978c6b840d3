"""The Triton client's run over a stand-in server (the python backend's SequenceStore on
the local engine, no Triton): it segments and scores as run_one does, and a run stopped
mid-document resumes from its progress file, on a restarted server, to the same answer
bit for bit (the meter's and the state's saved form)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rmt_deploy.manifest import read_manifest
from rmt_deploy.runtime import open_model
from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine
from rmt_deploy.runtime.generation import GenerationOptions
from rmt_deploy.runtime.options import RuntimeOptions
from rmt_deploy.runtime.tokens import manifest_tokenizer
from rmt_deploy.segmentation import content_id_range, step_inputs
from rmt_deploy.serving.client import Answer, Generation, TritonClient
from rmt_deploy.serving.errors import StateFileError
from rmt_deploy.serving.failover import DEFAULT_RETRY
from rmt_deploy.serving.identity import model_identity
from rmt_deploy.serving.progress import Progress, load_progress, save_progress
from rmt_deploy.serving.sequences import SequenceStore, StepRequest


class LocalClient(TritonClient):
    """A TritonClient whose server is a SequenceStore in this process, sent chunks of
    ``chunk_segments`` segments; after ``stop_after`` chunks, the client is stopped
    (KeyboardInterrupt)."""

    def __init__(self, export, stop_after: int | None = None, chunk_segments: int = 1) -> None:
        manifest = read_manifest(export)
        self.config, self.model_id = manifest.config, model_identity(manifest)
        self.tokenizer = manifest_tokenizer(manifest)
        self.model, self.keeps_state, self.chunk_segments = "local", False, chunk_segments
        self.retry = DEFAULT_RETRY
        engine = OnnxRuntimeEngine(manifest, RuntimeOptions(threads=1))
        self.store = SequenceStore(engine, manifest.load_initial_state(), idle_seconds=60)
        self.stop_after, self.chunks = stop_after, 0
        self.marks_context = True  # False: the server never hears that a chunk is context

    def send(self, chunks):
        for chunk in chunks:
            if self.stop_after is not None and self.chunks == self.stop_after:
                raise KeyboardInterrupt
            self.chunks += 1
            (result,) = self.store.execute([StepRequest(
                chunk.sequence_id, chunk.start, chunk.end, chunk.input_ids,
                chunk.attention_mask, chunk.state_in, wants_logits=chunk.logits,
                question_context=chunk.question_context and self.marks_context)])
            yield Answer(result.logits, result.state)

    def generate(self, sequence_id, question, options, start=False, end=False, state_in=None,
                 on_token=None):
        ids, mask = step_inputs([np.asarray(question)], self.config)
        (result,) = self.store.execute([StepRequest(sequence_id, start, end, ids, mask,
                                                    state_in, generate=options)])
        return Generation(result.generated, None, result.state)


def same(got, expected) -> None:
    """Bit for bit."""
    assert (got.tokens, got.segments) == (expected.tokens, expected.segments)
    np.testing.assert_array_equal(got.memory, expected.memory)
    if hasattr(expected, "logits"):
        np.testing.assert_array_equal(got.logits, expected.logits)
        assert (got.label, got.scores) == (expected.label, expected.scores)
    else:
        assert got.perplexity == expected.perplexity


@pytest.fixture(params=["encoder", "decoder"])
def export(request, encoder_export, memory_decoder_export):
    return encoder_export if request.param == "encoder" else memory_decoder_export


def test_only_the_logits_read_are_asked_for(encoder_export, memory_decoder_export):
    """An encoder's chunks ask for logits only at the document's end; a decoder's every
    chunk does (perplexity)."""
    low, high = content_id_range(read_manifest(encoder_export).config)
    document = np.random.default_rng(2).integers(low, high, size=300).tolist()
    client = LocalClient(encoder_export, chunk_segments=2)
    assert same(client.run(document).output, open_model(encoder_export).run_one(document)) \
        is None
    assert client.chunks > 2 and client.store.stepper.seen(True)[0] == 0
    decoder = LocalClient(memory_decoder_export, chunk_segments=2)
    segments = decoder.run(document).output.segments
    assert decoder.store.stepper.seen(True)[0] == segments - 1  # the first is not counted
    assert decoder.store.stepper.seen(False)[0] == 0


def test_a_sliding_window_armt_answers_as_rmt_run_generate(window_export):
    """run(..., generate=): the context's chunks are marked as a question's context, so
    the server reads them without the window, as rmt-run --generate (and the authors'
    generate) reads them: the same ids and the same state after the context. Unmarked,
    the context is read with the window and the state differs."""
    folder, _ = window_export
    document = [(5 * i + 2) % 50 for i in range(40)]  # 7 segments of 6, the last short
    options = GenerationOptions(max_new_tokens=8)
    expected = open_model(folder, backend="onnxruntime", threads=1).run_one(
        document, generate=options)
    for chunk_segments in (1, 2):
        client = LocalClient(folder, chunk_segments=chunk_segments)
        got = client.run(document, generate=options).output
        assert got.generated_ids == expected.generated_ids and len(got.generated_ids) == 8
        np.testing.assert_array_equal(got.memory, expected.memory)
    unmarked = LocalClient(folder, chunk_segments=2)
    unmarked.marks_context = False
    windowed = unmarked.run(document, generate=options).output
    assert np.abs(windowed.memory - expected.memory).max() > 1e-3


@pytest.mark.parametrize("size", [1, 3])
def test_a_stopped_run_resumes_from_its_progress_to_the_same_answer(export, size, tmp_path):
    """Chunks of one or several segments: the answer equals run_one's bit for bit."""
    model = open_model(export, threads=1)
    config = model.config
    low, high = content_id_range(config)
    rng = np.random.default_rng(3)
    for n in (config.segment_size * 4 + 1, config.segment_size * 5):
        doc = rng.integers(low, high, n).tolist()
        local = model.run_one(doc)
        same(LocalClient(export, chunk_segments=size).run(doc).output, local)
        for stop in sorted({1, (local.segments - 1) // size}):
            progress = tmp_path / f"progress-{n}-{stop}-{size}"
            with pytest.raises(KeyboardInterrupt):
                LocalClient(export, stop, size).run(doc, progress_file=progress)
            assert load_progress(progress, config).next_segment == stop * size
            resumed = LocalClient(export, chunk_segments=size).run(doc, progress_file=progress)
            assert resumed.segments_sent == local.segments - stop * size
            same(resumed.output, local)


@pytest.mark.parametrize("nll, count", [(math.inf, 3), (math.nan, 3), (1.5, -2)])
def test_progress_with_an_impossible_score_is_refused(memory_decoder_export, tmp_path, nll,
                                                      count):
    """A sealed progress file whose perplexity so far cannot be resumed (a log-likelihood
    that is not finite, a negative count) is refused as damaged, not resumed to NaN."""
    manifest = read_manifest(memory_decoder_export)
    config = manifest.config
    path = tmp_path / "progress"
    save_progress(path, Progress(model_identity(manifest), "d" * 64, 40, 3,
                                 manifest.load_initial_state(),
                                 np.zeros(config.vocab_size, np.float32), nll, count))
    with pytest.raises(StateFileError, match="damaged or truncated progress file"):
        load_progress(path, config)


def test_progress_without_the_logits_it_needs_is_refused(encoder_export, memory_decoder_export,
                                                          tmp_path):
    """Logits may be left out only where nothing reads them yet (an encoder's document not
    finished); a finished encoder document or a decoder's progress without them is
    damaged."""
    for export, done in ((encoder_export, False), (encoder_export, True),
                         (memory_decoder_export, False)):
        manifest = read_manifest(export)
        config = manifest.config
        tokens = 10 * config.segment_size
        path = tmp_path / f"progress-{config.variant}-{done}"
        save_progress(path, Progress(model_identity(manifest), "d" * 64, tokens,
                                     10 if done else 3, manifest.load_initial_state(), None))
        if config.is_encoder and not done:
            assert load_progress(path, config).logits is None
        else:
            with pytest.raises(StateFileError, match="damaged or truncated progress file"):
                load_progress(path, config)
