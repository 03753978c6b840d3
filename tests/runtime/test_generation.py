"""Generation that sees memory and sampling bugs: a decoder whose outputs depend on its
memory (checked here), every CPU backend's prefill and decode after an odd and an even
number of written segments against the PyTorch reference, greedy and sampled; the
sampler against a reference of temperature -> top-k -> top-p on the same random stream;
EOS in a batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import GPT2_EOS
from generation_reference import (
    DOCS,
    GREEDY,
    SAMPLED,
    check_backend_generation,
    kept_tokens,
    memory_before,
    reference_choice,
    reference_generation,
    reference_loop,
)

from rmt_deploy.contract import reported
from rmt_deploy.manifest import read_manifest
from rmt_deploy.model.checkpoint import load_checkpoint
from rmt_deploy.runtime import open_model
from rmt_deploy.runtime.backends.base import EngineState
from rmt_deploy.runtime.generation import GenerationOptions, TokenChooser, generate
from rmt_deploy.runtime.options import RuntimeOptions
from rmt_deploy.runtime.stepper import Stepper
from rmt_deploy.segmentation import segment_bounds

torch.set_num_threads(1)

@pytest.fixture(scope="module")
def reference(memory_decoder_checkpoint):
    return load_checkpoint(memory_decoder_checkpoint).rmt


@pytest.fixture(scope="module")
def onnx_model(memory_decoder_export):
    return open_model(memory_decoder_export, threads=1)


def engine_of(name: str, export):
    """A backend's engine on the export, computing in FP32."""
    manifest = read_manifest(export)
    options = RuntimeOptions(threads=1)
    if name == "openvino":
        pytest.importorskip("openvino", reason="openvino is not installed")
        from rmt_deploy.runtime.backends.openvino import OpenVinoEngine

        return OpenVinoEngine(manifest, options, compute="fp32"), manifest
    from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine

    return OnnxRuntimeEngine(manifest, options), manifest


# -- the decoder these tests use depends on its memory ------------------------------------


def test_the_memory_decoder_generates_from_its_memory(reference):
    """Zeroing the memory, or reading the memory of one segment earlier, changes the ids
    of most generations and moves the first logits by far more than float noise."""
    zeroed = stale = 0
    for doc in DOCS[1:]:
        memory = memory_before(reference, doc)
        ids, (logits, *_) = reference_generation(reference, doc, memory, GREEDY)
        blank, (blank_logits, *_) = reference_generation(reference, doc,
                                                         torch.zeros_like(memory), GREEDY)
        earlier, _ = reference_generation(reference, doc, memory_before(reference, doc, 2),
                                          GREEDY)
        zeroed += blank != ids
        stale += earlier != ids
        assert np.abs(blank_logits - logits).max() > 0.1 * np.ptp(logits)
    assert zeroed >= len(DOCS) - 3 and stale >= len(DOCS) - 3, (zeroed, stale)


# -- every CPU backend, after an odd and an even number of steps --------------------------


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_prefill_and_decode_after_odd_and_even_steps_equal_the_reference(
        backend, memory_decoder_export, reference):
    engine, manifest = engine_of(backend, memory_decoder_export)
    check_backend_generation(engine, manifest.load_initial_state(), reference)


def test_generation_reads_the_memory_the_last_written_segment_left(onnx_model, reference):
    """``run`` writes every segment but the last before generating: its ids are the
    reference's from that memory, which differ from those of the memory before it."""
    differ = 0
    for doc in DOCS[2:]:
        expected, _ = reference_generation(reference, doc, memory_before(reference, doc),
                                           SAMPLED)
        earlier, _ = reference_generation(reference, doc, memory_before(reference, doc, 2),
                                          SAMPLED)
        assert onnx_model.run_one(doc, generate=SAMPLED).generated_ids == expected
        differ += earlier != expected
    assert differ >= len(DOCS) - 4


# -- sampling ----------------------------------------------------------------------------


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [
    (0.6, 0, 1.0), (1.8, 0, 1.0), (0.6, 0, 0.8), (1.8, 0, 0.5), (0.6, 7, 1.0),
    (1.8, 7, 0.6), (0.4, 20, 0.95), (2.5, 3, 0.999),
])
@pytest.mark.parametrize("seed", [0, 11])
def test_the_sampler_equals_a_reference_of_temperature_top_k_top_p(temperature, top_k, top_p,
                                                                   seed):
    logits = np.random.default_rng(100 + seed).normal(scale=3.0, size=(4, 40, 60))
    options = GenerationOptions(4, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=seed)
    choose, rng = TokenChooser(options), np.random.default_rng(seed)
    for step in logits:  # one stream over the steps, as generation uses it
        np.testing.assert_array_equal(choose(step), reference_choice(step, options, rng))


def test_the_reference_sampler_keeps_what_hugging_faces_warpers_keep():
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(3).normal(scale=3.0, size=(200, 60))
    for temperature, top_k, top_p in ((0.5, 10, 0.7), (1.7, 25, 0.9), (0.8, 0, 0.6)):
        options = GenerationOptions(1, temperature=temperature, top_k=top_k, top_p=top_p)
        scores = torch.from_numpy(logits)
        warpers = [TemperatureLogitsWarper(temperature)] + (
            [TopKLogitsWarper(top_k)] if top_k else []) + [TopPLogitsWarper(top_p)]
        for warper in warpers:
            scores = warper(None, scores)
        for row, warped in zip(logits, scores, strict=True):
            order, probabilities = kept_tokens(row, options)
            assert set(order.tolist()) == set(torch.isfinite(warped).nonzero()[:, 0].tolist())
            np.testing.assert_allclose(probabilities, warped.softmax(-1)[order].numpy(),
                                       rtol=1e-9)


# -- EOS in a batch ----------------------------------------------------------------------


class ScriptedState(EngineState):
    """Logits that make row r choose ``script[r][t]`` at generation step t."""

    def __init__(self, script: list[list[int]], vocab: int) -> None:
        super().__init__(len(script))
        self.script, self.vocab, self.decodes = script, vocab, 0

    def _logits(self, step: int) -> np.ndarray:
        logits = np.zeros((self.batch, self.vocab), np.float32)
        for row, tokens in enumerate(self.script):
            logits[row, tokens[step]] = 10.0
        return logits

    def prefill(self, input_ids, attention_mask, capacity=None):
        return self._logits(0), 0

    def decode(self, cache, input_ids, attention_mask):
        self.decodes += 1
        return self._logits(cache + 1), cache + 1

    def load(self, state):
        raise AssertionError("generation does not load the state")

    def state(self):
        raise AssertionError("generation does not read the state")

    def step(self, input_ids, attention_mask, logits=True):
        raise AssertionError("generation does not step")


def test_a_row_that_emits_eos_stays_done_while_the_others_go_on(reference):
    config = reference.rmt_config
    script = [[4, GPT2_EOS, 7, 8, 9, 10], [5, 6, 7, 8, 9, 10], [GPT2_EOS, 3, GPT2_EOS, 3, 3, 3]]
    state = ScriptedState(script, config.vocab_size)
    generated = generate(state, config, [np.array([1, 2])] * 3, GenerationOptions(5))
    assert generated == [[4, GPT2_EOS], [5, 6, 7, 8, 9], [GPT2_EOS]]
    assert state.decodes == 4
    state = ScriptedState([[4, GPT2_EOS, 7, 8], [GPT2_EOS, 1, 1, 1]], config.vocab_size)
    assert generate(state, config, [np.array([1])] * 2, GenerationOptions(4)) == [
        [4, GPT2_EOS], [GPT2_EOS]]
    assert state.decodes == 1  # every row done: no more steps


def test_sampled_generation_in_a_batch_equals_the_reference_loop(onnx_model, reference):
    """Rows sampled together, hot enough that some emit EOS early: each row's tokens are
    those the reference loop draws from the logits every step saw, and ``run`` gives
    the same."""
    docs = DOCS * 2
    options = GenerationOptions(14, temperature=4.0, seed=8)
    seen = []
    with Stepper(onnx_model.engine) as stepper:
        for row, doc in enumerate(docs):
            stepper.add(row, {reported(onnx_model.config).name_in:
                              memory_before(reference, doc)[0].numpy()})
        lasts = [np.array(doc[segment_bounds(len(doc), onnx_model.config)[-1][0]:])
                 for doc in docs]
        generated = stepper.generate(list(range(len(docs))), lasts, options,
                                     on_logits=lambda logits: seen.append(logits.copy()))
    assert generated == reference_loop(seen, options, GPT2_EOS)
    ended = [ids for ids in generated if ids[-1] == GPT2_EOS]
    assert ended and min(len(ids) for ids in ended) < options.max_new_tokens
    assert max(len(ids) for ids in generated) == options.max_new_tokens
    assert all(GPT2_EOS not in ids[:-1] for ids in generated)
    run = onnx_model.run(docs, generate=options).outputs
    assert [output.generated_ids for output in run] == generated
