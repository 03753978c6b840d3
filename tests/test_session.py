"""Stream sessions: any chunking of a document gives exactly what one run_one call gives,
the result at any time is run_one on what was fed so far, state saves and restores (in
another process too), concurrent and batched sessions keep apart, bad input is refused
without disturbing anything."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from rmt_deploy.errors import InputError
from rmt_deploy.runtime import SessionPool, StreamSession, open_model
from rmt_deploy.runtime.backends.wrapped import WrappedEngine, WrappedState
from rmt_deploy.runtime.batcher import StepBatcher
from rmt_deploy.runtime.stepper import Stepper
from rmt_deploy.segmentation import (
    content_id_range,
    first_size,
    segment_bounds,
    segment_end,
    stream_first_sizes,
)

PUNCTUATION = (",", ".", "!", "?", "'", "(", ")", "-")
MULTIBYTE = ("é", "日本", "😀", "naïve", "Ω")
SEPARATORS = (" ", "  ", "\n", "\t", "\r\n", " \n ", "\u00a0")


@pytest.fixture(scope="module")
def encoder_model(encoder_export):
    return open_model(encoder_export, threads=1)


@pytest.fixture(scope="module")
def decoder_model(memory_decoder_export):
    return open_model(memory_decoder_export, threads=1)


@pytest.fixture(params=["encoder", "decoder"])
def model(request, encoder_model, decoder_model):
    return encoder_model if request.param == "encoder" else decoder_model


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message, message
    return message


def random_text(model, rng: random.Random, n_words: int) -> str:
    def word() -> str:
        if model.config.is_encoder:
            return f"w{rng.randrange(45)}"
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 5)))

    pieces = [rng.choice(["", " ", "\n"])]
    for _ in range(n_words):
        kind = rng.random()
        pieces.append(word() if kind < 0.75 else rng.choice(PUNCTUATION + MULTIBYTE))
        pieces.append(rng.choice(SEPARATORS) if rng.random() < 0.85 else "")
    pieces.append(word())
    return "".join(pieces)


def split(data, rng: random.Random, largest: int) -> list:
    pieces, start = [], 0
    while start < len(data):
        size = rng.randint(1, largest)
        pieces.append(data[start: start + size])
        start += size
    return pieces


def assert_same(got, expected) -> None:
    """Bit-for-bit the same result."""
    assert got is not None
    assert (got.tokens, got.segments) == (expected.tokens, expected.segments)
    np.testing.assert_array_equal(got.memory, expected.memory)
    if hasattr(expected, "logits"):
        np.testing.assert_array_equal(got.logits, expected.logits)
        assert got.label == expected.label and got.scores == expected.scores
    else:
        assert got.perplexity == expected.perplexity


# -- chunking never changes the result ----------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_random_str_chunks_equal_one_run(model, seed):
    rng = random.Random(seed)
    text = random_text(model, rng, rng.randint(20, 60))
    expected = model.run_one(text)
    assert expected.segments >= 3
    for largest in (1, 4, 40, len(text)):
        session = model.session()
        for piece in split(text, rng, largest):
            session.feed(piece)
        assert_same(session.result(), expected)
        assert_same(session.close(), expected)
        assert_same(session.result(), expected)  # closed: the final result


@pytest.mark.parametrize("seed", range(3))
def test_random_byte_chunks_split_characters_and_equal_one_run(model, seed):
    rng = random.Random(100 + seed)
    text = random_text(model, rng, 40) + " 😀日本é"
    data = text.encode()
    expected = model.run_one(text)
    for largest in (1, 2, 5, 30):
        session = model.session()
        pieces = split(data, rng, largest)
        for piece in pieces:
            session.feed(piece)
        assert_same(session.close(), expected)


@pytest.mark.parametrize("seed", range(3))
def test_token_id_chunks_equal_one_run(model, seed):
    rng = np.random.default_rng(seed)
    high = 50 if model.config.is_encoder else 59
    ids = rng.integers(0, high, size=int(rng.integers(1, 60)))
    expected = model.run_one(ids)  # special tokens in ids are stripped by both
    session = model.session()
    start = 0
    while start < len(ids):
        size = int(rng.integers(0, 13))
        session.feed(ids[start: start + size].tolist() if size % 2 else ids[start: start + size])
        start += size
    assert_same(session.close(), expected)


@pytest.mark.parametrize("seed", range(3))
def test_result_at_any_time_is_one_run_on_the_text_so_far(model, seed):
    rng = random.Random(200 + seed)
    text = random_text(model, rng, 40)
    session = model.session()
    fed = ""
    for piece in split(text, rng, 12):
        session.feed(piece)
        fed += piece
        got = session.result()
        if not fed.strip():
            assert got is None
            continue
        expected = model.run_one(fed)  # the unfinished word counts as a word
        assert_same(got, expected)
        assert_same(session.result(), expected)  # reading changes nothing
    assert_same(session.close(), model.run_one(text))


def test_right_aligned_sessions_read_the_track_of_the_length_so_far(encoder_model):
    size = encoder_model.config.segment_size
    ids = list(range(5, 50)) * 2
    session = encoder_model.session()
    for n in range(1, 3 * size + 2):
        session.feed(ids[n - 1: n])
        assert_same(session.result(), encoder_model.run_one(ids[:n]))
    assert session.tokens == 3 * size + 1
    assert_same(session.close(), encoder_model.run_one(ids[: 3 * size + 1]))


class RecordingRows(Stepper):
    """A stepper that keeps the segments each row stepped."""

    def __init__(self, engine):
        super().__init__(engine)
        self.stepped = defaultdict(list)

    def step(self, keys, segments, logits=True):
        for key, tokens in zip(keys, segments, strict=True):
            self.stepped[key[1]].append(tokens.tolist())
        return super().step(keys, segments, logits)


def walked(ids, first: int, config) -> list[list[int]]:
    """The complete segments of ``ids`` in the segmentation whose first takes ``first``."""
    segments, start = [], 0
    while (end := segment_end(start, first, config)) <= len(ids):
        segments.append(ids[start:end].tolist())
        start = end
    return segments


@pytest.mark.parametrize("known", [False, True], ids=["unknown_length", "known_length"])
def test_sessions_step_the_segments_of_segmentation(model, known):
    """Lengths around segment boundaries, fed token by token: every track steps the
    segmentation of its first size, the one the final length picks steps exactly
    ``segment_bounds`` (a left-aligned short last segment runs on a copy at the end), and
    the answer is run_one's."""
    config = model.config
    size = config.segment_size
    low, high = content_id_range(config)
    ids = np.random.default_rng(7).integers(low, high, 4 * size + 1)
    lengths = sorted({1, 2, 4 * size + 1} | {k * size + d for k in (1, 2, 3) for d in (-1, 0, 1)})
    for n in lengths:
        rows = RecordingRows(model.engine)
        session = StreamSession(model, total_tokens=n if known else None, rows=rows)
        for token in ids[:n]:
            session.feed([int(token)])
        firsts = stream_first_sizes(n if known else None, config)
        assert sorted(rows.stepped) == sorted(f for f in firsts if walked(ids[:n], f, config))
        for first in firsts:
            assert rows.stepped.get(first, []) == walked(ids[:n], first, config), (n, first)
        bounds = [ids[start:end].tolist() for start, end in segment_bounds(n, config)]
        assert rows.stepped[first_size(n, config)] == [
            segment for segment in bounds if len(segment) == size or config.alignment == "right"]
        assert_same(session.close(), model.run_one(ids[:n]))
        rows.close()


def test_known_length_runs_one_track(encoder_model):
    ids = list(range(5, 48))
    session = encoder_model.session(total_tokens=len(ids))
    assert len(session._tracks) == 1
    for start in range(0, len(ids), 7):
        session.feed(ids[start: start + 7])
    assert_same(session.close(), encoder_model.run_one(ids))
    short = encoder_model.session(total_tokens=5)
    with pytest.raises(InputError) as error:
        short.feed(ids[:6])
    assert "total_tokens" in one_line(error)
    short.feed(ids[:5])  # the refused piece left nothing behind
    assert_same(short.close(), encoder_model.run_one(ids[:5]))


def test_mixed_text_and_ids_end_the_word(encoder_model):
    tokenizer = encoder_model.tokenizer
    session = encoder_model.session()
    session.feed("w1 w2 w3")
    session.feed([7, 8])
    session.feed(" w4 w5")
    ids = tokenizer.encode("w1 w2 w3", add_special_tokens=False).ids + [7, 8] + \
        tokenizer.encode(" w4 w5", add_special_tokens=False).ids
    assert_same(session.close(), encoder_model.run_one(ids))


def test_empty_and_special_only_sessions_have_no_result(encoder_model):
    session = encoder_model.session()
    assert session.result() is None
    session.feed("  \n [CLS] [SEP] ")
    assert session.result() is None and session.tokens == 0
    assert session.close() is None


# -- saved state --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_state_restores_mid_word_and_mid_character(model, seed):
    rng = random.Random(300 + seed)
    text = random_text(model, rng, 50) + " naïve日本"
    data = text.encode()
    expected = model.run_one(text)
    cut = rng.randrange(1, len(data) - 1)
    cut = data.index("ï".encode()) + 1 if seed == 0 else cut  # inside a character
    session = model.session()
    for piece in split(data[:cut], rng, 9):
        session.feed(piece)
    saved = session.save()
    before = session.result()
    restored = model.restore_session(saved)
    assert restored.tokens == session.tokens
    if before is None:
        assert restored.result() is None
    else:
        assert_same(restored.result(), before)
    for piece in split(data[cut:], rng, 9):
        restored.feed(piece)
    assert_same(restored.close(), expected)
    # the saved state is a value: restoring it again gives the same again
    again = model.restore_session(saved)
    again.feed(data[cut:])
    assert_same(again.close(), expected)


def test_state_restores_in_another_process(encoder_model, encoder_export, tmp_path):
    text = random_text(encoder_model, random.Random(5), 60)
    cut = len(text) // 2 + 1
    session = encoder_model.session()
    session.feed(text[:cut])
    (tmp_path / "state.bin").write_bytes(session.save())
    (tmp_path / "rest.txt").write_text(text[cut:], encoding="utf-8")
    script = (
        "import json, sys, pathlib\n"
        "from rmt_deploy.runtime import open_model\n"
        "model = open_model(sys.argv[1], threads=1)\n"
        "folder = pathlib.Path(sys.argv[2])\n"
        "session = model.restore_session((folder / 'state.bin').read_bytes())\n"
        "session.feed((folder / 'rest.txt').read_text(encoding='utf-8'))\n"
        "out = session.close()\n"
        "print(json.dumps({'logits': out.logits.tolist(), 'memory': out.memory.tolist()}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(encoder_export), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(done.stdout)
    expected = encoder_model.run_one(text)
    np.testing.assert_array_equal(np.float32(got["logits"]), expected.logits)
    np.testing.assert_array_equal(np.float32(got["memory"]), expected.memory)


@pytest.mark.parametrize("pooled", [False, True])
def test_forks_read_a_context_once_and_answer_many(model, pooled):
    """Forks of a session mid-word go on apart; each equals run_one on the context and
    its own question, and the session forked is unchanged (alone or in a pool)."""
    rng = random.Random(11)
    context = random_text(model, rng, 40)[:-1]  # ends inside a word
    questions = [random_text(model, rng, n) for n in (3, 9, 1)]
    pool = SessionPool(model) if pooled else None
    session = model.session() if pool is None else pool.get(pool.open())
    session.feed(context)
    forks = [session.fork() for _ in questions]
    for fork, question in zip(forks, questions, strict=True):
        fork.feed(question)
    for fork, question in zip(forks, questions, strict=True):
        assert_same(fork.close(), model.run_one(context + question))
    assert_same(session.close(), model.run_one(context))
    if pool is not None:
        pool.shutdown()


def test_state_from_another_model_is_refused(encoder_model, decoder_model, encoder_checkpoint):
    encoder_state = encoder_model.session().save()
    with pytest.raises(InputError) as error:
        decoder_model.restore_session(encoder_state)
    assert "another model" in one_line(error)
    reference = open_model(encoder_checkpoint)  # same weights, but not this export
    with pytest.raises(InputError) as error:
        reference.restore_session(encoder_state)
    assert "another model" in one_line(error)


def test_damaged_state_is_refused(encoder_model):
    session = encoder_model.session()
    session.feed("w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w1")
    saved = session.save()
    flipped = bytearray(saved)
    flipped[len(saved) // 2] ^= 1
    cases = [saved[:-1], saved[: len(saved) // 2], saved[:12], bytes(flipped), b"",
             b"PK\x03\x04 a zip file", "not bytes"]
    for data in cases:
        with pytest.raises(InputError) as error:
            StreamSession.restore(encoder_model, data, name="s.state")
        message = one_line(error)
        assert "s.state" in message, message
    # ... and the session it came from is untouched
    session.feed(" w13")
    assert_same(session.close(), encoder_model.run_one("w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 "
                                                       "w12 w1 w13"))


# -- bad pieces ---------------------------------------------------------------------------


@pytest.mark.parametrize(("piece", "words"), [
    (b"w1 \xff w2", "not UTF-8"),
    (b"w1 \x00 w2", "NUL"),
    ("w1 \ud800 w2", "surrogate"),
    (7, "got int"),
    (None, "got NoneType"),
    ({"w1": 1}, "got dict"),
    ([1.5, 2.5], "1-D"),
    (["w1", "w2"], "1-D"),
    (np.zeros((2, 3), dtype=np.int64), "1-D"),
    ([5, 99], "[0, 53)"),
])
def test_bad_pieces_are_refused_and_disturb_nothing(encoder_model, piece, words):
    text = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 naï"
    session = encoder_model.session()
    session.feed(text.encode()[:-1])  # ends inside "ï"
    with pytest.raises(InputError) as error:
        session.feed(piece)
    assert words in one_line(error)
    session.feed(text.encode()[-1:] + b" w14")
    assert_same(session.close(), encoder_model.run_one(text + " w14"))


def test_a_closed_session_refuses_pieces(encoder_model):
    session = encoder_model.session()
    session.feed("w1 w2")
    final = session.close()
    for call in (lambda: session.feed("w3"), session.save):
        with pytest.raises(InputError) as error:
            call()
        assert "closed" in one_line(error)
    assert session.close() is final


def test_text_ending_inside_a_character_cannot_close(encoder_model):
    session = encoder_model.session()
    session.feed("w1 é".encode()[:-1])
    with pytest.raises(InputError) as error:
        session.close()
    assert "UTF-8 character" in one_line(error)
    session.feed(b"\xa9")
    assert_same(session.close(), encoder_model.run_one("w1 é"))


# -- many sessions ------------------------------------------------------------------------


def documents(model, count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [random_text(model, rng, rng.randint(5, 40)) for _ in range(count)]


def stream(session_feed, text: str, seed: int) -> None:
    for piece in split(text, random.Random(seed), 15):
        session_feed(piece)


def test_threads_with_their_own_sessions_keep_apart(model):
    texts = documents(model, 8, seed=9)
    expected = [model.run_one(text) for text in texts]

    def work(index: int):
        session = model.session()
        stream(session.feed, texts[index], index)
        return session.close()

    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(work, range(len(texts))))
    for ours, theirs in zip(got, expected, strict=True):
        assert_same(ours, theirs)


@pytest.mark.parametrize("batch", [True, False])
def test_pool_sessions_from_threads_equal_one_by_one(model, batch):
    texts = documents(model, 8, seed=11)
    expected = [model.run_one(text) for text in texts]
    with SessionPool(model, batch=batch, max_rows=32) as pool:
        ids = [pool.open() for _ in texts]

        def work(index: int):
            stream(lambda piece: pool.feed(ids[index], piece), texts[index], index)
            middle = pool.result(ids[index])
            return middle, pool.close(ids[index])

        with ThreadPoolExecutor(max_workers=8) as executor:
            got = list(executor.map(work, range(len(texts))))
        assert len(pool) == 0
    for (middle, final), theirs in zip(got, expected, strict=True):
        assert_same(middle, theirs)
        assert_same(final, theirs)


class GatedEngine(WrappedEngine):
    """The real engine, whose first step waits until the test opens the gate."""

    def __init__(self, engine):
        super().__init__(engine)
        self.entered, self.gate = threading.Event(), threading.Event()
        self.batches: list[int] = []

    def wrap(self, state):
        return _GatedState(self, state)


class _GatedState(WrappedState):
    def step(self, input_ids, attention_mask, logits=True):
        owner = self.owner
        if not owner.batches:
            owner.entered.set()
            owner.gate.wait(timeout=30)
        owner.batches.append(len(input_ids))
        return super().step(input_ids, attention_mask, logits)


def test_batcher_runs_waiting_sessions_as_one_step(decoder_model):
    engine = GatedEngine(decoder_model.engine)
    batcher = StepBatcher(engine)
    size = decoder_model.config.segment_size
    segments = [np.arange(5 + row, 5 + row + size) for row in range(5)]
    with Stepper(decoder_model.engine) as alone:
        expected = []
        for row in range(5):
            alone.add(row, decoder_model.initial_state)
            expected.append((alone.step([row], segments[row: row + 1]), None))
            expected[-1] = (expected[-1][0], alone.state(row)["memory_in"])
    for row in range(5):
        batcher.add(row, decoder_model.initial_state)
    results: dict[int, np.ndarray] = {}

    def call(row: int) -> None:
        results[row] = batcher.step([row], segments[row: row + 1])

    first = threading.Thread(target=call, args=(0,))
    first.start()
    assert engine.entered.wait(timeout=30)  # the first request alone is in the engine
    others = [threading.Thread(target=call, args=(row,)) for row in range(1, 5)]
    for thread in others:
        thread.start()
    while len(batcher._queue) < 4:  # ... while the others queue up behind it
        time.sleep(0.001)
    engine.gate.set()
    for thread in [first, *others]:
        thread.join()
    memory = batcher.states(range(5))["memory_in"]
    batcher.close()
    assert engine.batches == [1, 4]
    assert (batcher.steps, batcher.rows) == (2, 5)
    for row in range(5):
        np.testing.assert_array_equal(results[row], expected[row][0])
        np.testing.assert_array_equal(memory[row], expected[row][1])


def test_pool_errors(encoder_model):
    with SessionPool(encoder_model) as pool:
        name = pool.open("doc-1")
        assert name == "doc-1" and "doc-1" in pool
        cases = [
            (lambda: pool.feed("nope", "w1"), "unknown session 'nope'"),
            (lambda: pool.result("nope"), "unknown session"),
            (lambda: pool.close("nope"), "unknown session"),
            (lambda: pool.save("nope"), "unknown session"),
            (lambda: pool.open("doc-1"), "already open"),
            (lambda: pool.open(""), "non-empty"),
            (lambda: pool.restore(b"junk"), "not an rmt-deploy session state"),
        ]
        for call, words in cases:
            with pytest.raises(InputError) as error:
                call()
            assert words in one_line(error)
        pool.feed("doc-1", "w1 w2 w3")
        copy = pool.restore(pool.save("doc-1"))
        pool.feed(copy, " w4")
        assert_same(pool.close(copy), encoder_model.run_one("w1 w2 w3 w4"))
        assert_same(pool.close("doc-1"), encoder_model.run_one("w1 w2 w3"))
        with pytest.raises(InputError, match="unknown session 'doc-1'"):
            pool.feed("doc-1", "w5")
    with pytest.raises(InputError) as error:
        pool.open()
    assert "shut down" in one_line(error)
