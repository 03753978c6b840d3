"""The step contract: every variant's tensors, dynamic axes and profile ranges derive from
the config, and the runtime's input checks name what is wrong."""

import numpy as np
import pytest
from conftest import make_decoder, make_encoder

from rmt_deploy.contract import (
    ATTENTION_MASK,
    DECODE,
    INPUT_IDS,
    LOGITS,
    MEMORY_IN,
    MEMORY_OUT,
    PREFILL,
    STEP,
    WRITE,
    BatchProfile,
    check_feed,
    profile_shapes,
    state_pairs,
    variant,
    variant_names,
)
from rmt_deploy.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def encoder_config():
    return make_encoder(input_size=16, num_mem_tokens=3).rmt_config


@pytest.fixture(scope="module")
def decoder_config():
    return make_decoder(num_mem_tokens=2, segment_size=5).rmt_config


def test_variants_of_each_kind(encoder_config, decoder_config):
    assert variant_names(encoder_config) == (STEP, WRITE)
    assert variant_names(decoder_config) == (STEP, WRITE, PREFILL, DECODE)
    with pytest.raises(ConfigError, match="has no 'prefill' graph"):
        variant(encoder_config, PREFILL)


def test_encoder_step_tensors(encoder_config):
    step = variant(encoder_config, STEP)
    assert [(t.name, t.dtype, t.shape) for t in step.inputs] == [
        (INPUT_IDS, "int64", ("batch", 16)), (ATTENTION_MASK, "int64", ("batch", 16)),
        (MEMORY_IN, "float32", ("batch", 3, 32))]
    assert [(t.name, t.shape) for t in step.outputs] == [
        (LOGITS, ("batch", 3)), (MEMORY_OUT, ("batch", 3, 32))]
    assert step.reads == step.writes == state_pairs(encoder_config)
    assert step.dynamic_axes() == {INPUT_IDS: {0: "batch"}, ATTENTION_MASK: {0: "batch"},
                                   MEMORY_IN: {0: "batch"}, LOGITS: {0: "batch"},
                                   MEMORY_OUT: {0: "batch"}}


def test_the_write_variant_returns_the_memory_only(encoder_config, decoder_config):
    for config in (encoder_config, decoder_config):
        write, step = variant(config, WRITE), variant(config, STEP)
        assert write.inputs == step.inputs and write.outputs == step.outputs[1:]
        assert write.writes == step.writes and (write.file, write.plan_file) == ("write.onnx",
                                                                         "write.plan")


def test_generation_variants_carry_the_kv_cache(decoder_config):
    layers, heads, width = (decoder_config.cache_layers, decoder_config.cache_heads,
                            decoder_config.head_dim)
    prefill, decode = variant(decoder_config, PREFILL), variant(decoder_config, DECODE)
    assert [t.name for t in prefill.inputs] == [INPUT_IDS, ATTENTION_MASK, MEMORY_IN]
    assert prefill.outputs[0].shape == ("batch", decoder_config.vocab_size)  # last token only
    cache = [f"{kind}.{i}.{part}" for kind in ("past",) for i in range(layers)
             for part in ("key", "value")]
    assert [t.name for t in decode.inputs] == [INPUT_IDS, ATTENTION_MASK, *cache]
    assert decode.inputs[0].shape == ("batch", 1)
    assert decode.inputs[1].shape == ("batch", "total")
    assert decode.inputs[2].shape == ("batch", heads, "past", width)
    assert [t.name for t in decode.outputs][1:] == [n.replace("past", "present") for n in cache]
    assert decode.outputs[1].shape == ("batch", heads, "total", width)
    assert prefill.outputs[1].shape == ("batch", heads, "context", width)
    assert not prefill.writes and decode.writes == decode.reads != prefill.reads
    assert (decode.file, decode.plan_file) == ("decode.onnx", "decode.plan")


def test_encoder_profile_fixes_the_segment_and_spans_the_batch(encoder_config):
    shapes = profile_shapes(encoder_config, STEP, BatchProfile(1, 4, 8))
    assert shapes[INPUT_IDS] == ((1, 16), (4, 16), (8, 16))
    assert shapes[ATTENTION_MASK] == shapes[INPUT_IDS]
    assert shapes[MEMORY_IN] == ((1, 3, 32), (4, 3, 32), (8, 3, 32))


def test_decoder_profiles_leave_room_for_short_segments_and_generation(decoder_config):
    step = profile_shapes(decoder_config, STEP, BatchProfile(1, 2, 4))
    assert step[INPUT_IDS] == ((1, 1), (2, 5), (4, 5))
    decode = profile_shapes(decoder_config, DECODE, BatchProfile(1, 1, 1), max_new_tokens=10)
    # memory 2 + segment 5 + 10 new tokens - 1 cached before the last one
    assert decode["past.0.key"] == ((1, 2, 3, 16), (1, 2, 7, 16), (1, 2, 16, 16))
    assert decode[ATTENTION_MASK] == ((1, 4), (1, 8), (1, 17))
    long = profile_shapes(decoder_config, DECODE, BatchProfile(1, 1, 1), max_new_tokens=100)
    assert long[ATTENTION_MASK][2] == (1, 64)  # capped by the model's 64 positions


@pytest.mark.parametrize(("text", "expected"), [("8", (1, 8, 8)), ("1,4,16", (1, 4, 16))])
def test_batch_option_parses(text, expected):
    profile = BatchProfile.parse(text)
    assert (profile.min, profile.opt, profile.max) == expected


@pytest.mark.parametrize("text", ["0", "4,2,8", "1,2", "a", "2,2,4"])
def test_bad_batch_options_say_how_to_fix(text):
    with pytest.raises(ConfigError, match="--batch"):
        BatchProfile.parse(text)


def feed(ids, mask=None, memory=None):
    ids = np.asarray(ids)
    return {INPUT_IDS: ids, ATTENTION_MASK: np.ones_like(ids) if mask is None else mask,
            MEMORY_IN: np.zeros((len(ids), 2, 32), np.float32) if memory is None else memory}


def test_a_decode_feed_must_cover_the_cache_and_the_new_token(decoder_config):
    past = {name: np.zeros((1, 2, 4, 16), np.float32) for name in
            [f"past.{i}.{k}" for i in range(2) for k in ("key", "value")]}
    feed = {INPUT_IDS: np.ones((1, 1), np.int64), **past}
    check_feed(decoder_config, DECODE, {**feed, ATTENTION_MASK: np.ones((1, 5), np.int64)})
    with pytest.raises(InputError, match="must cover the 4 cached ones and the new token"):
        check_feed(decoder_config, DECODE, {**feed, ATTENTION_MASK: np.ones((1, 4), np.int64)})


def test_a_valid_decoder_feed_passes(decoder_config):
    check_feed(decoder_config, STEP, feed(np.array([[1, 2, 3]], np.int64)))


@pytest.mark.parametrize(("make", "words"), [
    (lambda: feed(np.array([[1, 2]], np.int32)), "input_ids is int32"),
    (lambda: feed(np.ones((1, 6), np.int64)), "tokens 6; the model takes 1 to 5"),
    (lambda: feed(np.ones((1, 3), np.int64), mask=np.ones((1, 4), np.int64)),
     "the same for every input"),
    (lambda: feed(np.ones((1, 3), np.int64), memory=np.zeros((1, 3, 32), np.float32)),
     "memory_in has shape"),
    (lambda: feed(np.full((1, 3), 60, np.int64)), "token ids must lie in \\[0, 60\\)"),
    (lambda: feed(np.ones((1, 3), np.int64), mask=np.full((1, 3), 2, np.int64)), "0 or 1"),
    (lambda: {INPUT_IDS: np.ones((1, 3), np.int64)}, "attention_mask is missing"),
])
def test_a_bad_feed_names_what_is_wrong(decoder_config, make, words):
    with pytest.raises(InputError, match=words):
        check_feed(decoder_config, STEP, make())


def test_armt_state_is_fp32_per_layer_and_its_decode_reads_it():
    from dataclasses import replace

    from rmt_deploy.spec import RMTConfig

    config = replace(RMTConfig.armt(num_mem_tokens=2, hidden_size=8, vocab_size=20,
                                    segment_size=4, d_mem=3, correction=True,
                                    pad_token_id=0),
                     cache_layers=2, cache_heads=2, head_dim=4)
    pairs = state_pairs(config)
    assert [(p.name_in, p.name_out, p.dtype, p.row_shape) for p in pairs] == [
        ("A.0", "A_out.0", "float32", (18, 8)), ("z.0", "z_out.0", "float32", (18,)),
        ("A.1", "A_out.1", "float32", (18, 8)), ("z.1", "z_out.1", "float32", (18,)),
        ("started", "started_out", "float32", (1,))]
    assert variant(config, STEP).reads == pairs == variant(config, STEP).writes
    decode = variant(config, DECODE)
    assert decode.reads[: len(pairs)] == pairs and decode.writes[0].name_in == "past.0.key"
    assert variant(config, PREFILL).reads == pairs
    shapes = profile_shapes(config, PREFILL, BatchProfile(1, 1, 2))
    assert shapes[INPUT_IDS] == ((1, 1), (1, 4), (2, 4))  # no memory slots in the context
    assert profile_shapes(config, DECODE, BatchProfile(), 3)["past.0.key"][2][2] == 6
