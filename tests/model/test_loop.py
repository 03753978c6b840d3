"""The reference loop against independent, hand-written computations of the authors'
semantics, and per-row batching against running each document alone."""

import pytest
import torch
from conftest import GPT2_EOS, make_decoder, make_encoder

from rmt_deploy.model.loop import decoder_loss, generate, run_decoder, run_encoder

torch.set_num_threads(1)

DOCS = [list(range(5, 45)), [2, *range(10, 27), 3, 0], list(range(6, 12))]


def by_hand_encoder(rmt, doc):
    """The authors' encoder loop written out: strip, split right-aligned, lay out
    [CLS] mem [SEP] tokens [SEP] [PAD], memory through inputs_embeds."""
    config, model = rmt.rmt_config, rmt.model
    m, size = config.num_mem_tokens, config.segment_size
    tokens = [t for t in doc if t not in (0, 2, 3)]
    ends = list(range(len(tokens), 0, -size))[::-1]
    segments = [tokens[max(0, end - size) : end] for end in ends]
    embeddings = model.get_input_embeddings().weight
    memory = embeddings[list(config.mem_token_ids)].unsqueeze(0)
    for segment in segments:
        ids = [2, *config.mem_token_ids, 3, *segment, 3]
        ids = torch.tensor([ids + [0] * (config.input_size - len(ids))])
        embeds = embeddings[ids].clone()
        embeds[:, 1 : 1 + m] = memory
        out = model(inputs_embeds=embeds, attention_mask=(ids != 0).long(),
                    token_type_ids=torch.zeros_like(ids), output_hidden_states=True)
        memory = out.hidden_states[-1][:, 1 : 1 + m]
    return out.logits[0], memory[0], len(segments)


def by_hand_decoder(rmt, doc):
    """The authors' MemoryCell/RecurrentWrapper: left-aligned segments, [mem; x; mem],
    positions arange(2M + L), memory from the last hidden state (after ln_f)."""
    model, m, size = rmt.model, rmt.rmt_config.num_mem_tokens, rmt.rmt_config.segment_size
    memory = rmt.memory.unsqueeze(0)
    logits = []
    for start in range(0, len(doc), size):
        ids = torch.tensor([doc[start : start + size]])
        embeds = torch.cat([memory, model.get_input_embeddings()(ids), memory], dim=1)
        out = model(inputs_embeds=embeds, output_hidden_states=True,
                    position_ids=torch.arange(embeds.shape[1]).unsqueeze(0))
        logits.append(out.logits[0, m:-m])
        memory = out.hidden_states[-1][:, -m:]
    return torch.cat(logits), memory[0]


@torch.no_grad()
def test_encoder_loop_matches_the_authors_semantics_by_hand():
    rmt = make_encoder()
    for doc in DOCS:
        result = run_encoder(rmt, [doc])
        logits, memory, n_segments = by_hand_encoder(rmt, doc)
        assert result.segments == [n_segments]
        torch.testing.assert_close(result.logits[0], logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(result.memory[0], memory, rtol=0, atol=1e-6)
    assert result.segments[0] >= 1 and n_segments > 0


@torch.no_grad()
def test_encoder_batch_of_different_lengths_equals_each_alone():
    rmt = make_encoder()
    batch = run_encoder(rmt, DOCS)
    assert batch.segments == [4, 2, 1]
    for row, doc in enumerate(DOCS):
        alone = run_encoder(rmt, [doc])
        torch.testing.assert_close(batch.logits[row], alone.logits[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(batch.memory[row], alone.memory[0], rtol=0, atol=1e-6)


@torch.no_grad()
def test_encoder_memory_carries_information_between_segments():
    rmt = make_encoder()
    a = run_encoder(rmt, [[7] * 10 + list(range(20, 30))]).logits
    b = run_encoder(rmt, [[8] * 10 + list(range(20, 30))]).logits
    assert not torch.allclose(a, b)


@torch.no_grad()
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_loop_matches_the_authors_semantics_by_hand(family):
    rmt = make_decoder(family=family)
    for doc in ([t % 59 for t in range(5, 45)], list(range(6, 12)), list(range(10, 13))):
        result = run_decoder(rmt, [doc])
        logits, memory = by_hand_decoder(rmt, doc)
        torch.testing.assert_close(result.logits[0], logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(result.memory[0], memory, rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_batch_of_different_lengths_equals_each_alone(family):
    rmt = make_decoder(family=family)
    docs = [list(range(1, 23)), list(range(30, 37)), list(range(40, 43))]
    batch = run_decoder(rmt, docs)
    assert batch.segments == [5, 2, 1]
    for row, doc in enumerate(docs):
        alone = run_decoder(rmt, [doc])
        torch.testing.assert_close(batch.logits[row], alone.logits[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(batch.memory[row], alone.memory[0], rtol=0, atol=1e-5)


def test_decoder_loss_is_the_authors_shifted_cross_entropy():
    rmt = make_decoder()
    ids = torch.randint(0, 59, (2, 13), generator=torch.Generator().manual_seed(0))
    loss = decoder_loss(rmt, ids, ids)
    logits = torch.stack([by_hand_decoder(rmt, row.tolist())[0] for row in ids])
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    loss.backward()
    assert rmt.memory.grad is not None and rmt.memory.grad.abs().sum() > 0


@torch.no_grad()
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generation_reads_the_last_segment_without_write_slots(family):
    """The reference generates as the authors do: Hugging Face generate with its KV
    cache from [memory ; last segment]."""
    rmt = make_decoder(family=family)
    doc = list(range(1, 14))  # segments of 5, 5, 3
    generated = generate(rmt, doc, 6)
    assert generated == authors_generate(rmt, doc, 6)


@torch.no_grad()
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_generation_equals_the_authors_for_a_padded_batch(family):
    """DecoderRMT.prefill/decode (the exported generation graphs) on a batch of last
    segments of different lengths give each row the authors' tokens."""
    rmt = make_decoder(family=family)
    docs = [list(range(1, 14)), list(range(20, 31)), [7, 8, 40, 41, 42, 43, 44, 45, 50]]
    size, m = rmt.rmt_config.segment_size, rmt.rmt_config.num_mem_tokens
    heads = [doc[: (len(doc) - 1) // size * size] for doc in docs]
    lasts = [doc[len(head):] for doc, head in zip(docs, heads, strict=True)]
    memory = torch.cat([by_hand_decoder(rmt, head)[1].unsqueeze(0) for head in heads])
    width = max(map(len, lasts))
    ids = torch.tensor([last + [0] * (width - len(last)) for last in lasts])
    mask = torch.tensor([[1] * len(last) + [0] * (width - len(last)) for last in lasts])
    logits, *cache = rmt.prefill(ids, mask, memory)
    attended = torch.cat([torch.ones(len(docs), m, dtype=torch.long), mask], dim=1)
    generated = [[] for _ in docs]
    for _ in range(5):
        tokens = logits.argmax(-1)
        for row, token in enumerate(tokens.tolist()):
            generated[row].append(token)
        attended = torch.cat([attended, torch.ones(len(docs), 1, dtype=torch.long)], dim=1)
        logits, *cache = rmt.decode(tokens[:, None], attended, *cache)
    for row, doc in enumerate(docs):
        expected = authors_generate(rmt, doc, 5)
        assert generated[row][: len(expected)] == expected, row


def authors_generate(rmt, doc, new_tokens):
    """Hugging Face generate from [memory ; last segment], the memory by hand, up to the
    first EOS token (where generation stops)."""
    size = rmt.rmt_config.segment_size
    head = doc[: (len(doc) - 1) // size * size]
    _, memory = by_hand_decoder(rmt, head)
    embeds = torch.cat([memory.unsqueeze(0),
                        rmt.model.get_input_embeddings()(torch.tensor([doc[len(head):]]))],
                       dim=1)
    expected = rmt.model.generate(
        inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
        max_new_tokens=new_tokens, do_sample=False, pad_token_id=GPT2_EOS, eos_token_id=None,
    )
    tokens = expected[0, -new_tokens:].tolist()
    return tokens[: tokens.index(GPT2_EOS) + 1] if GPT2_EOS in tokens else tokens


@torch.no_grad()
def test_roberta_style_encoder_keeps_the_layout_and_its_position_limit():
    import transformers

    from rmt_deploy.model.base import build_encoder_base
    from rmt_deploy.model.factory import SpecialTokens, encoder_from_base

    torch.manual_seed(0)
    config = transformers.RobertaConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=34, num_labels=2, pad_token_id=1)
    rmt = encoder_from_base(build_encoder_base(config), num_mem_tokens=3, input_size=32,
                            labels=("x", "y"), special=SpecialTokens(pad=1, cls=0, sep=2))
    assert rmt.rmt_config.max_positions == 32  # RoBERTa positions start after the pad id
    docs = [list(range(3, 60)), list(range(5, 20))]
    batch = run_encoder(rmt.eval(), [[t % 47 + 3 for t in d] for d in docs])
    for row, doc in enumerate(docs):
        alone = run_encoder(rmt, [[t % 47 + 3 for t in doc]])
        torch.testing.assert_close(batch.logits[row], alone.logits[0], rtol=0, atol=1e-6)
