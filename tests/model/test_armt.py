"""The reference ARMT against the authors' code (benchmarks/authors_armt.py): logits,
every layer's (A, z) and greedy ids, with and without the correction; memory matters."""

import pytest
import torch
from armt_models import ARMT_D_MEM, ARMT_MEM, ARMT_SEGMENT, make_armt, map_weights

from benchmarks.authors_armt import authors_armt
from rmt_deploy.errors import CheckpointError
from rmt_deploy.model.armt import dpfp, generate_armt, run_armt
from rmt_deploy.model.base import build_decoder_base
from rmt_deploy.model.factory import SpecialTokens, armt_from_base

torch.set_num_threads(1)

DOC = torch.tensor([(7 * i + 3) % 58 for i in range(20)])  # 4 segments, the last short


def window_armt(correction: bool = True):
    return make_armt(correction=correction, sliding_window=True)


def oracle(rmt):
    return authors_armt(rmt.model, num_mem_tokens=ARMT_MEM, d_mem=ARMT_D_MEM,
                        segment_size=ARMT_SEGMENT, correction=rmt.rmt_config.correction,
                        memory=rmt.memory.detach(), maps=map_weights(rmt))


def test_dpfp_is_the_products_with_rolls():
    x = torch.tensor([[1.0, -2.0]])
    xp = torch.tensor([[1.0, 0.0, 0.0, 2.0]])  # [relu(x), relu(-x)]
    expected = torch.cat([xp * xp.roll(j, -1) for j in (1, 2, 3)], dim=-1)
    assert torch.equal(dpfp(x), expected)
    assert dpfp(torch.randn(2, 5, 4)).shape == (2, 5, 24)


@pytest.mark.parametrize("correction", [True, False])
def test_reference_equals_the_authors_code(correction):
    rmt = make_armt(correction=correction)
    authors = oracle(rmt)
    logits, state = run_armt(rmt, DOC)
    with torch.no_grad():
        expected = authors(DOC.view(1, -1))[0]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    for index, layer in enumerate(authors.memory_cell.layers):
        torch.testing.assert_close(state[2 * index], layer.W_mem, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(state[2 * index + 1], layer.z, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("correction", [True, False])
@pytest.mark.parametrize("length", [4, 20])  # one segment (no reads), four
def test_greedy_ids_equal_the_authors_generate(correction, length):
    rmt = make_armt(correction=correction)
    doc = DOC[:length]
    with torch.no_grad():
        expected = oracle(rmt).generate(doc.view(1, -1), max_new_tokens=8, do_sample=False,
                                        pad_token_id=rmt.rmt_config.eos_token_id)
    assert generate_armt(rmt, doc, 8) == expected[0].tolist()


def test_correction_changes_the_state():
    on, off = run_armt(make_armt(correction=True), DOC)[1], run_armt(
        make_armt(correction=False), DOC)[1]
    assert not torch.allclose(on[1], off[1])


def test_zeroing_the_state_changes_the_outputs():
    rmt = make_armt()
    _, state = run_armt(rmt, DOC[:12])
    tail, mask = DOC[None, 12:18], torch.ones(1, 6, dtype=torch.long)
    with torch.no_grad():
        kept = rmt(tail, mask, *state)[0]
        zeroed = rmt(tail, mask, *(torch.zeros_like(s) for s in state[:-1]), state[-1])[0]
    assert (kept - zeroed).abs().max() > 0.1


def test_generation_reads_the_state():
    rmt = make_armt()
    _, state = run_armt(rmt, DOC[:18])
    tail, mask = DOC[None, 18:], torch.ones(1, 2, dtype=torch.long)
    with torch.no_grad():
        kept = rmt.read(tail, mask, *state)
        zeroed = rmt.read(tail, mask, *(torch.zeros_like(s) for s in state[:-1]), state[-1])
    assert (kept - zeroed).abs().max() > 0.1


def test_prefill_and_decode_equal_the_whole_read():
    rmt = make_armt()
    _, state = run_armt(rmt, DOC[:12])
    tokens = DOC[None, 12:18]
    with torch.no_grad():
        whole = rmt.read(tokens, torch.ones_like(tokens), *state)[0]
        logits, *past = rmt.prefill(tokens[:, :4], torch.ones(1, 4, dtype=torch.long), *state)
        steps = [logits[0]]
        for n in (5, 6):
            logits, *past = rmt.decode(tokens[:, n - 1 : n], torch.ones(1, n, dtype=torch.long),
                                       *state, *past)
            steps.append(logits[0])
    torch.testing.assert_close(torch.stack(steps), whole[3:], rtol=1e-4, atol=1e-5)


def test_a_padded_row_computes_what_it_computes_alone():
    rmt = make_armt()
    _, state = run_armt(rmt, DOC[:6])
    rows = [DOC[6:12], DOC[12:16]]
    ids = torch.stack([rows[0], torch.cat([rows[1], torch.zeros(2, dtype=torch.long)])])
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    batched_state = [torch.cat([s, s]) for s in state]
    with torch.no_grad():
        logits, *new = rmt(ids, mask, *batched_state)
        alone, *alone_new = rmt(rows[1][None], torch.ones(1, 4, dtype=torch.long), *state)
    torch.testing.assert_close(logits[1, :4], alone[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(new, alone_new, strict=True):
        torch.testing.assert_close(a[1], b[0], rtol=1e-4, atol=1e-6)


def test_started_marks_the_first_segment():
    """A zero state read as a later segment differs from the first segment (the
    correction's g), so the mark matters; after a step it is set."""
    rmt = make_armt(correction=True)
    ids = DOC[None, :6]
    state = rmt.zero_state(1)
    with torch.no_grad():
        _, *first = rmt(ids, torch.ones_like(ids), *state)
        _, *later = rmt(ids, torch.ones_like(ids), *state[:-1], torch.ones(1, 1))
    assert first[-1].item() == 1.0
    assert not torch.allclose(first[1], later[1])


def test_state_stays_float32_when_the_layers_run_in_half():
    rmt = make_armt().to(torch.bfloat16)
    state = rmt.zero_state(1)
    ids = DOC[None, :6]
    with torch.no_grad():
        _, *new = rmt(ids, torch.ones_like(ids), *state)
    assert all(s.dtype == torch.float32 for s in new)


def test_factory_refuses_maps_that_do_not_fit():
    base = build_decoder_base(make_armt().model.config)
    kwargs = {"num_mem_tokens": 2, "segment_size": 4, "correction": False,
              "special": SpecialTokens()}
    weights = map_weights(make_armt())
    with pytest.raises(CheckpointError, match="1 layers of memory maps"):
        armt_from_base(base, d_mem=ARMT_D_MEM, maps=weights[:1], **kwargs)
    with pytest.raises(CheckpointError, match="W_mq.weight is"):
        armt_from_base(base, d_mem=ARMT_D_MEM + 1, maps=weights, **kwargs)
    with pytest.raises(CheckpointError, match="lack W_mb.bias"):
        armt_from_base(base, d_mem=ARMT_D_MEM, **kwargs,
                       maps=[{k: v for k, v in w.items() if k != "W_mb.bias"} for w in weights])


def test_rows_of_one_batch_keep_their_own_first_segment_mark():
    """Row 0 is marked as a document's first segment (its state is not read), row 1 is a
    later one, in one batch: each computes what it computes alone."""
    rmt = make_armt()
    _, state = run_armt(rmt, DOC[:6])
    first = (*state[:-1], torch.zeros(1, 1))
    ids = DOC[6:12].view(1, -1)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        batched = rmt(ids.repeat(2, 1), mask.repeat(2, 1),
                      *(torch.cat([a, b]) for a, b in zip(first, state, strict=True)))
        for row, row_state in enumerate((first, state)):
            alone = rmt(ids, mask, *row_state)
            for got, expected in zip(batched, alone, strict=True):
                torch.testing.assert_close(got[row], expected[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched[0][0], batched[0][1])


@pytest.mark.parametrize("correction", [True, False])
@pytest.mark.parametrize("length", [6, 20])  # one segment (no window), four (a short last)
def test_sliding_window_equals_the_authors_code(correction, length):
    """Logits, every layer's (A, z) and the carried window equal the authors' forward
    with sliding_window=True; the window changes what the segments compute."""
    rmt, doc = window_armt(correction), DOC[:length]
    authors = oracle(rmt)
    logits, state = run_armt(rmt, doc)
    with torch.no_grad():
        expected = authors(doc.view(1, -1), sliding_window=True)[0]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    for index, layer in enumerate(authors.memory_cell.layers):
        torch.testing.assert_close(state[2 * index], layer.W_mem, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(state[2 * index + 1], layer.z, rtol=1e-4, atol=1e-6)
    window, window_mask = state[-2:]
    carried = int(window_mask[0].sum())
    assert window_mask[0].tolist() == [1] * carried + [0] * (ARMT_SEGMENT - carried)
    for index, layer in enumerate(authors.past_key_values.layers):
        torch.testing.assert_close(window[0, index, 0, :, :carried], layer.keys[0])
        torch.testing.assert_close(window[0, index, 1, :, :carried], layer.values[0])
    if length > ARMT_SEGMENT:
        assert not torch.allclose(logits, run_armt(rmt, doc, window=False)[0])


@pytest.mark.parametrize("length", [4, 20])
def test_sliding_window_greedy_ids_equal_the_authors_generate(length):
    """The authors' generate takes no window: the earlier segments run without it."""
    rmt, doc = window_armt(), DOC[:length]
    with torch.no_grad():
        expected = oracle(rmt).generate(doc.view(1, -1), max_new_tokens=8, do_sample=False,
                                        pad_token_id=rmt.rmt_config.eos_token_id)
    assert generate_armt(rmt, doc, 8) == expected[0].tolist()


def test_sliding_window_padded_row_computes_what_it_computes_alone():
    """A right-padded row of a batched window step equals the row run alone."""
    rmt = window_armt()
    ids = torch.stack([DOC[:6], torch.cat([DOC[6:10], torch.zeros(2, dtype=torch.long)])])
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        first = rmt(DOC[:6].view(1, -1), torch.ones(1, 6, dtype=torch.long),
                    *rmt.zero_state(1))
        state = [torch.cat([t, t]) for t in first[1:]]
        batched = rmt(ids, mask, *state)
        alone = rmt(DOC[6:10].view(1, -1), torch.ones(1, 4, dtype=torch.long), *first[1:])
    torch.testing.assert_close(batched[0][1, :4], alone[0][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(batched[1:], alone[1:], strict=True):
        torch.testing.assert_close(a[1], b[0], rtol=1e-4, atol=1e-6)
