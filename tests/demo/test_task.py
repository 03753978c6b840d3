"""Tests for the word-level fact-memorization task."""

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from rmt_deploy.demo.task import (
    CLS_ID,
    FACT_LEN,
    LABELS,
    MIN_TOKENS,
    MODES,
    NAMES,
    PAD_ID,
    QUESTION_LEN,
    SEP_ID,
    SPECIAL_TOKENS,
    TOKEN_TO_ID,
    VOCAB,
    WORDS_PER_LINE,
    MemorizeTask,
    build_tokenizer,
    ids_to_text,
    tokenizer_json,
    write_inputs,
)

NAME_IDS = {TOKEN_TO_ID[w] for w in NAMES}
PLACE_IDS = {TOKEN_TO_ID[w] for w in LABELS}
NOT_IN_NOISE = NAME_IDS | PLACE_IDS | {TOKEN_TO_ID[w] for w in ("went", "where", "is", "?")}
LENGTHS = (MIN_TOKENS, 11, 15, 16, 17, 21, 100, 1003)


def fact_position(ids: np.ndarray) -> int:
    """Index of the fact: the first name token (names never occur in the noise)."""
    return int(np.flatnonzero(np.isin(ids, list(NAME_IDS)))[0])


def check_sample(ids: np.ndarray, label: int, n_tokens: int) -> int:
    """Assert the sample's structure and return the fact position."""
    assert ids.dtype == np.int64 and ids.shape == (n_tokens,)
    pos = fact_position(ids)
    name = ids[pos]
    fact = [name, TOKEN_TO_ID["went"], TOKEN_TO_ID["to"], TOKEN_TO_ID["the"],
            TOKEN_TO_ID[LABELS[label]], TOKEN_TO_ID["."]]  # fmt: skip
    assert ids[pos : pos + FACT_LEN].tolist() == fact
    question = [TOKEN_TO_ID["where"], TOKEN_TO_ID["is"], name, TOKEN_TO_ID["?"]]
    assert ids[-QUESTION_LEN:].tolist() == question
    assert pos == 0 or ids[pos - 1] == TOKEN_TO_ID["."]
    noise = np.concatenate((ids[:pos], ids[pos + FACT_LEN : -QUESTION_LEN]))
    assert not np.isin(noise, list(NOT_IN_NOISE)).any()
    assert (noise >= len(SPECIAL_TOKENS)).all()
    return pos


def test_vocabulary() -> None:
    assert len(VOCAB) == len(set(VOCAB))
    assert 250 <= len(VOCAB) <= 300
    assert VOCAB[: len(SPECIAL_TOKENS)] == ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    assert (PAD_ID, CLS_ID, SEP_ID) == (0, 2, 3)
    assert len(NAMES) == 12
    assert LABELS == ("bathroom", "hallway", "garden", "office", "bedroom", "kitchen")
    assert set(NAMES) <= set(VOCAB) and set(LABELS) <= set(VOCAB)
    assert all(w == w.lower() for w in VOCAB[len(SPECIAL_TOKENS) :])


def test_tokenizer_maps_every_word_to_itself() -> None:
    tok = build_tokenizer()
    words = VOCAB[len(SPECIAL_TOKENS) :]
    assert tok.encode(" ".join(words), add_special_tokens=False).ids == [
        TOKEN_TO_ID[w] for w in words
    ]
    enc = tok.encode("Mary went to the Kitchen. Zebra?", add_special_tokens=False)
    assert enc.tokens == ["mary", "went", "to", "the", "kitchen", ".", "[UNK]", "?"]
    assert tok.get_vocab_size() == len(VOCAB)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n_tokens", LENGTHS)
def test_exact_length_and_structure(mode: str, n_tokens: int) -> None:
    task = MemorizeTask(mode)
    for seed in range(20):
        ids, label = task.sample_ids(n_tokens, np.random.default_rng(seed))
        assert 0 <= label < len(LABELS)
        check_sample(ids, label, n_tokens)


@pytest.mark.parametrize("mode", MODES)
def test_noise_is_clean_over_big_sample(mode: str) -> None:
    ids, labels = MemorizeTask(mode).batch_ids(5, 40_000, seed=7)
    for row, label in zip(ids, labels, strict=True):
        check_sample(row, int(label), 40_000)


def test_fact_position_by_mode() -> None:
    memorize = MemorizeTask("memorize").batch_ids(30, 500, seed=1)[0]
    assert all(fact_position(row) == 0 for row in memorize)
    detect = MemorizeTask("detect").batch_ids(30, 500, seed=1)[0]
    positions = [fact_position(row) for row in detect]
    assert len(set(positions)) > 10
    assert max(positions) > 250 and all(p <= 500 - MIN_TOKENS for p in positions)


@pytest.mark.parametrize("mode", MODES)
def test_determinism_by_seed(mode: str) -> None:
    task = MemorizeTask(mode)
    a_ids, a_labels = task.batch_ids(4, 300, seed=3)
    b_ids, b_labels = task.batch_ids(4, 300, seed=3)
    np.testing.assert_array_equal(a_ids, b_ids)
    np.testing.assert_array_equal(a_labels, b_labels)
    c_ids, _ = task.batch_ids(4, 300, seed=4)
    assert not np.array_equal(a_ids, c_ids)
    assert a_ids.dtype == np.int64 and a_labels.dtype == np.int64
    first, label = task.sample_ids(300, np.random.default_rng(3))
    np.testing.assert_array_equal(first, a_ids[0])
    assert label == a_labels[0]


@pytest.mark.parametrize("mode", MODES)
def test_text_matches_ids_through_tokenizer(mode: str) -> None:
    task = MemorizeTask(mode)
    tokenizers = (build_tokenizer(), Tokenizer.from_str(tokenizer_json()))
    for seed in range(5):
        for n_tokens in LENGTHS:
            text, text_label = task.sample_text(n_tokens, np.random.default_rng(seed))
            ids, label = task.sample_ids(n_tokens, np.random.default_rng(seed))
            assert text_label == label
            assert text == ids_to_text(ids)
            assert "  " not in text and text.endswith(" ?")
            for tok in tokenizers:
                assert tok.encode(text, add_special_tokens=False).ids == ids.tolist()


@pytest.mark.parametrize("mode", MODES)
def test_write_inputs_round_trip(tmp_path: Path, mode: str) -> None:
    out = tmp_path / "inputs"
    paths = write_inputs(out, n_samples=3, n_tokens=2_345, seed=11, mode=mode)
    assert [p.name for p in paths] == ["sample_00000.txt", "sample_00001.txt", "sample_00002.txt"]
    ids, labels = MemorizeTask(mode).batch_ids(3, 2_345, seed=11)
    tok = Tokenizer.from_str(tokenizer_json())
    for path, row in zip(paths, ids, strict=True):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        assert len(lines) > 1 and all(len(line.split()) <= WORDS_PER_LINE for line in lines)
        assert tok.encode(text, add_special_tokens=False).ids == row.tolist()
    answers = (out / "answers.tsv").read_text(encoding="utf-8").splitlines()
    assert answers == [f"{p.name}\t{LABELS[lab]}" for p, lab in zip(paths, labels, strict=True)]
    expected = sorted([p.name for p in paths] + ["answers.tsv"])
    assert sorted(p.name for p in out.iterdir()) == expected  # no temp files left behind


def test_label_balance() -> None:
    _, labels = MemorizeTask().batch_ids(600, MIN_TOKENS + 2, seed=0)
    counts = np.bincount(labels, minlength=len(LABELS))
    assert counts.sum() == 600 and len(counts) == len(LABELS)
    assert counts.min() >= 60 and counts.max() <= 140


def test_bad_arguments(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown mode"):
        MemorizeTask("recall")
    with pytest.raises(ValueError, match="unknown mode"):
        write_inputs(tmp_path, 1, 100, 0, mode="recall")
    with pytest.raises(ValueError, match="probability"):
        MemorizeTask(adj_prob=1.5)
    with pytest.raises(ValueError, match="n_tokens must be >= 10"):
        MemorizeTask().sample_ids(MIN_TOKENS - 1, rng)
    with pytest.raises(ValueError, match="n_tokens must be >= 10"):
        MemorizeTask("detect").sample_text(3, rng)
    with pytest.raises(ValueError, match="n_tokens must be >= 10"):
        MemorizeTask().batch_ids(2, 5, seed=0)
    with pytest.raises(ValueError, match="n_tokens must be an integer"):
        MemorizeTask().sample_ids(12.5, rng)
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        MemorizeTask().batch_ids(0, 100, seed=0)
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        write_inputs(tmp_path, 0, 100, 0)
    assert list(tmp_path.iterdir()) == []
