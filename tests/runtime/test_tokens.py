"""Input to token ids: chunked reading equals whole-text tokenization, in linear time and
fixed memory whatever the text holds; input errors are one-line InputErrors, and the
spooled and in-memory sources agree."""

from __future__ import annotations

import dataclasses
import io
import os
import random
import sys
import tempfile
import time
import unicodedata

import numpy as np
import pytest
from tokenizers import Tokenizer

from rmt_deploy.errors import InputError
from rmt_deploy.model.checkpoint import load_checkpoint
from rmt_deploy.runtime import tokens
from rmt_deploy.runtime.tokens import (
    MAX_WORD_CHARS,
    ArraySource,
    SpooledSource,
    TextStream,
    WordCutter,
    spool_file,
    text_chunks,
    text_source,
    tokenize_chunks,
    word_chunks,
)
from rmt_deploy.segmentation import strip_special

CHUNK_SIZES = (1, 2, 3, 7, 64, 1 << 20)
SEPARATORS = (" ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \t ", "\x0c", "\u00a0", "\u3000")
PUNCTUATION = (",", ".", "!", "?", ";", ":", "'", '"', "(", ")", "-", "...")
MULTIBYTE = ("é", "日本", "😀", "ß", "naïve", "Ω", "🎉🎉")


@pytest.fixture(scope="module")
def encoder_side(encoder_checkpoint):
    loaded = load_checkpoint(encoder_checkpoint)
    return Tokenizer.from_str(loaded.tokenizer_json), loaded.rmt.rmt_config


@pytest.fixture(scope="module")
def decoder_side(decoder_checkpoint):
    loaded = load_checkpoint(decoder_checkpoint)
    return Tokenizer.from_str(loaded.tokenizer_json), loaded.rmt.rmt_config


@pytest.fixture(params=["encoder", "decoder"])
def side(request, encoder_side, decoder_side):
    """(tokenizer, config, word maker) of either tiny model."""
    if request.param == "encoder":
        return (*encoder_side, lambda rng: f"w{rng.randrange(45)}")
    letters = "abcdefghijklmnopqrstuvwxyz"
    return (*decoder_side,
            lambda rng: "".join(rng.choice(letters) for _ in range(rng.randint(1, 6))))


def random_text(rng: random.Random, word, n_pieces: int) -> str:
    pieces = [rng.choice(["", " ", "\n", "\t "])]
    for _ in range(n_pieces):
        kind = rng.random()
        if kind < 0.55:
            pieces.append(word(rng))
        elif kind < 0.7:
            pieces.append(rng.choice(PUNCTUATION))
        elif kind < 0.8:
            pieces.append(rng.choice(MULTIBYTE))
        elif kind < 0.85:
            pieces.append(word(rng).upper())
        pieces.append(rng.choice(SEPARATORS) if rng.random() < 0.8 else "")
    pieces.append(word(rng))  # never whitespace-only
    pieces.append(rng.choice(["", " ", "\n", "\r\n", "  \n"]))
    return "".join(pieces)


def chunked_ids(text: str, tokenizer: Tokenizer, chunk_bytes: int) -> list[int]:
    chunks = text_chunks(io.BytesIO(text.encode("utf-8")), "test", chunk_bytes,
                         tokens.cut_check(tokenizer))
    return np.concatenate([np.zeros(0, np.int64), *tokenize_chunks(chunks, tokenizer)]).tolist()


def whole_ids(text: str, tokenizer: Tokenizer) -> list[int]:
    """The whole text's ids, with the special tokens the tokenizer puts around a text."""
    return tokenizer.encode(text).ids


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message, message
    return message


# -- chunked reading ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_chunked_tokenization_equals_whole_text(side, seed):
    tokenizer, _, word = side
    rng = random.Random(seed)
    for _ in range(4):
        text = random_text(rng, word, rng.randint(1, 40))
        expected = whole_ids(text, tokenizer)
        assert expected, text
        for chunk_bytes in CHUNK_SIZES:
            assert chunked_ids(text, tokenizer, chunk_bytes) == expected, (text, chunk_bytes)


@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 64])
def test_chunks_reassemble_the_text_and_end_at_word_ends(chunk_bytes):
    text = "w1 w2\t\tw3\r\nnaïve 日本語 😀😀,  end\n"
    chunks = list(text_chunks(io.BytesIO(text.encode()), "t", chunk_bytes))
    assert "".join(chunks) == text
    assert len(chunks) > 1
    for chunk in chunks[:-1]:
        assert not chunk[-1].isspace(), chunks  # every cut is right after a word
    for chunk in chunks[1:]:
        assert chunk[0].isspace(), chunks  # ... and right before whitespace


@pytest.mark.parametrize("separator", ["\x0b", "\x0c", "\x1c", "\x1f", "\x85"])
def test_chunks_never_cut_at_control_whitespace(encoder_side, separator):
    # BERT's normalizer deletes these (they are controls), joining "w1" and "w2" into one
    # unknown word; a cut there would split them into two known words.
    tokenizer, _ = encoder_side
    text = f"w1{separator}w2 w3{separator}w4"
    for chunk_bytes in (1, 2, 5):
        assert chunked_ids(text, tokenizer, chunk_bytes) == whole_ids(text, tokenizer)


def test_a_long_word_across_many_blocks_stays_whole(decoder_side):
    tokenizer, _ = decoder_side
    text = "ab " + "xyz" * 50 + " cd"
    chunks = list(text_chunks(io.BytesIO(text.encode()), "t", 4))
    assert "xyz" * 50 in chunks[1]
    assert chunked_ids(text, tokenizer, 4) == whole_ids(text, tokenizer)


# -- long runs without a word end --------------------------------------------------------


def is_break(char: str) -> bool:
    """Whitespace tokenizers split at: not the controls BERT deletes, joining words."""
    return char.isspace() and (char in "\t\n\r" or unicodedata.category(char) != "Cc")


def test_words_end_at_every_break_and_only_there():
    whitespace = "".join(filter(str.isspace, map(chr, range(sys.maxunicode + 1))))
    assert len(whitespace) > 20
    for char in whitespace:
        expected = ["a"] if is_break(char) else []
        assert WordCutter().push(f"a{char}b") == expected, hex(ord(char))
        assert WordCutter("a").push(f"{char}b") == expected, hex(ord(char))
        assert WordCutter().push(f" {char}b") == [], hex(ord(char))  # no word before it


def word_ends(text: str) -> list[int]:
    return [i for i in range(1, len(text)) if is_break(text[i]) and not text[i - 1].isspace()]


def rule_cuts(text: str, cap: int) -> list[int]:
    """Where the documented rule cuts besides word ends: a run from the last cut to the
    next word end longer than ``cap`` is cut at its last whitespace pair within ``cap``,
    else after ``cap`` characters."""
    cuts, start = [], 0
    for end in [*word_ends(text), len(text)]:
        while end - start > cap:
            pairs = [i for i in range(start + 1, start + cap + 1)
                     if text[i - 1].isspace() and text[i].isspace()]
            start = pairs[-1] if pairs else start + cap
            cuts.append(start)
        start = end
    return cuts


def cuts_off_word_ends(chunks: list[str], text: str) -> list[int]:
    assert "".join(chunks) == text
    assert all(chunks)
    ends = set(word_ends(text))
    positions = np.cumsum([len(chunk) for chunk in chunks[:-1]]).tolist()
    return [p for p in positions if p not in ends]


def random_pieces(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 30))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize("seed", range(8))
def test_long_runs_are_cut_where_the_text_says_however_it_is_pushed(monkeypatch, seed):
    monkeypatch.setattr(tokens, "MAX_WORD_CHARS", 8)
    rng = random.Random(seed)
    for _ in range(30):
        runs = [rng.choice("ab \t\n\x0c\u3000") * rng.choice([1, 1, 2, 5, 9, 17, 30])
                for _ in range(rng.randint(1, 12))]
        text = "".join(runs)
        expected = rule_cuts(text, 8)
        for pieces in ([text], list(text), random_pieces(rng, text)):
            chunks = list(word_chunks(pieces))
            assert cuts_off_word_ends(chunks, text) == expected, (text, pieces)
            assert max(len(chunk) for chunk in chunks) <= 2 * 8  # held + one slice


def test_normal_text_is_only_cut_at_word_ends(side):
    _, _, word = side
    text = random_text(random.Random(3), word, 300)
    pieces = random_pieces(random.Random(4), text)
    assert cuts_off_word_ends(list(word_chunks(pieces)), text) == []


def test_held_text_stays_bounded(decoder_side):
    # a run without a word end: a long word, spaces, control spaces between words
    tokenizer, _ = decoder_side
    for run in ("x" * 300_000, " " * 300_000, "ab\x0c" * 100_000):
        stream = TextStream(tokenizer)
        longest = 0
        for start in range(0, len(run), 4096):
            stream.feed(run[start : start + 4096])
            longest = max(longest, len(stream.tail))
        assert longest <= MAX_WORD_CHARS


def giant_text() -> str:
    return ("w1 w2 " + "x" * (2 * MAX_WORD_CHARS + 123) + " w3" + " " * (3 * MAX_WORD_CHARS)
            + "w4\n" + "\t " * MAX_WORD_CHARS + "w5 " + "y" * (MAX_WORD_CHARS + 1) + "\n")


def test_giant_words_read_the_same_from_a_str_a_file_and_a_stream(side, spool_dir):
    tokenizer, config, _ = side
    text = giant_text()
    expected = all_ids(text_source(text, tokenizer, config))
    for chunk_bytes in (4096, 7777, 1 << 20):
        chunks = text_chunks(io.BytesIO(text.encode()), "t", chunk_bytes,
                             tokens.cut_check(tokenizer))
        with SpooledSource(tokenize_chunks(chunks, tokenizer), config) as source:
            np.testing.assert_array_equal(all_ids(source), expected)
    for size in (1000, 50_000, len(text)):
        stream = TextStream(tokenizer)
        ids = [stream.feed(text[i : i + size]) for i in range(0, len(text), size)]
        read = np.concatenate([*ids, stream.finish()])
        np.testing.assert_array_equal(strip_special(read, config), expected)


def test_a_stream_rebuilt_from_its_tail_goes_on_the_same(decoder_side):
    tokenizer, _ = decoder_side
    data = giant_text().encode()
    stream = TextStream(tokenizer)
    expected = np.concatenate([stream.feed(data), stream.finish()])
    stream, ids = TextStream(tokenizer), []
    for start in range(0, len(data), 9999):  # pieces cut inside characters, too
        ids.append(stream.feed(data[start : start + 9999]))
        stream = TextStream(tokenizer, stream.tail, stream.pending, stream.started)
    np.testing.assert_array_equal(np.concatenate([*ids, stream.finish()]), expected)


def best_time(read, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        read()
        times.append(time.perf_counter() - start)
    return min(times)


def feed_in_pieces(tokenizer: Tokenizer, text: str, size: int = 1024) -> None:
    stream = TextStream(tokenizer)
    for start in range(0, len(text), size):
        stream.feed(text[start : start + size])
    stream.finish()


@pytest.mark.parametrize("run", ["x", " ", "ab\x0c", "w1 "])
def test_reading_takes_linear_time_whatever_the_text(decoder_side, run):
    # 4x the text must take about 4x the time (a quadratic read takes 16x)
    tokenizer, _ = decoder_side

    def read(n: int) -> float:
        text = run * (n // len(run)) + "w1"
        data = text.encode()
        chunked = best_time(lambda: sum(1 for _ in text_chunks(io.BytesIO(data), "t")))
        streamed = best_time(lambda: feed_in_pieces(tokenizer, text[: n // 4]))
        return chunked + streamed

    small, large = read(1 << 18), read(1 << 20)
    print(f"{run!r}: {small:.3f} s, 4x the text {large:.3f} s")
    assert large < 7 * small + 0.05, (small, large)




def read_all(data: bytes, chunk_bytes: int = 64) -> list[str]:
    return list(text_chunks(io.BytesIO(data), "doc.txt", chunk_bytes))


@pytest.mark.parametrize("chunk_bytes", [1, 4, 64])
def test_nul_bytes_are_refused_as_binary(chunk_bytes):
    with pytest.raises(InputError) as error:
        read_all(b"w1 w2 w3\x00\x01\x02 w4", chunk_bytes)
    message = one_line(error)
    assert "doc.txt" in message and "NUL" in message


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 64])
@pytest.mark.parametrize(("data", "offset", "byte"), [
    (b"w1 w2 \xff w3", 6, "0xff"),
    (b"w1 w2 \xe6\x97x w3", 6, "0xe6"),  # a character cut short by an ASCII byte
    (b"w1 \xc3\xa9 \x80 w3", 6, "0x80"),  # a stray continuation byte after valid UTF-8
    (b"w1 w2 \xe6\x97", 6, "0xe6"),  # the file ends inside a character
])
def test_invalid_utf8_names_the_offset(data, offset, byte, chunk_bytes):
    with pytest.raises(InputError) as error:
        read_all(data, chunk_bytes)
    message = one_line(error)
    assert f"offset {offset}" in message, message
    assert byte in message, message
    assert "UTF-8" in message


@pytest.mark.parametrize("data", [b"", b" ", b"  \n\t\r\n ", b"\n" * 100])
@pytest.mark.parametrize("chunk_bytes", [1, 64])
def test_empty_or_whitespace_only_input(data, chunk_bytes):
    with pytest.raises(InputError) as error:
        read_all(data, chunk_bytes)
    assert "empty" in one_line(error)


def test_text_after_leading_whitespace_is_not_empty():
    assert "".join(read_all(b"\n\n   \t w1", 1)) == "\n\n   \t w1"


def test_spool_file_refuses_a_directory(tmp_path, encoder_side):
    tokenizer, config = encoder_side
    with pytest.raises(InputError) as error:
        spool_file(tmp_path, tokenizer, config)
    message = one_line(error)
    assert "directory" in message and str(tmp_path) in message


def test_spool_file_refuses_a_missing_file(tmp_path, encoder_side):
    tokenizer, config = encoder_side
    missing = tmp_path / "nope.txt"
    with pytest.raises(InputError) as error:
        spool_file(missing, tokenizer, config)
    message = one_line(error)
    assert "no such file" in message and "nope.txt" in message


def test_spool_file_refuses_a_binary_file(tmp_path, encoder_side):
    tokenizer, config = encoder_side
    path = tmp_path / "image.bin"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputError) as error:
        spool_file(path, tokenizer, config)
    assert "image.bin" in one_line(error)


def test_text_source_refuses_empty_text_and_non_str(encoder_side):
    tokenizer, config = encoder_side
    for text in ("", "  \n\t"):
        with pytest.raises(InputError) as error:
            text_source(text, tokenizer, config)
        assert "empty" in one_line(error)
    with pytest.raises(InputError) as error:
        text_source(b"w1 w2", tokenizer, config)
    assert "bytes" in one_line(error)


# -- sources ------------------------------------------------------------------------------


@pytest.fixture
def spool_dir(tmp_path, monkeypatch):
    """Temporary files go to a folder of this test's own."""
    folder = tmp_path / "spool"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def all_ids(source) -> np.ndarray:
    return source.tokens(0, len(source))


@pytest.mark.parametrize("seed", range(3))
def test_spooled_source_equals_array_source(side, seed, spool_dir):
    tokenizer, config, word = side
    rng = random.Random(100 + seed)
    text = random_text(rng, word, 60)
    expected = all_ids(text_source(text, tokenizer, config))
    assert len(expected) > 10
    for chunk_bytes in (1, 7, 1 << 20):
        chunks = text_chunks(io.BytesIO(text.encode()), "t", chunk_bytes)
        with SpooledSource(tokenize_chunks(chunks, tokenizer), config) as source:
            assert len(source) == len(expected)
            got = all_ids(source)
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, expected)
            np.testing.assert_array_equal(source.tokens(3, 9), expected[3:9])
            np.testing.assert_array_equal(source.tokens(len(source) - 2, len(source)),
                                          expected[-2:])


def test_spool_file_from_path_and_stream(side, tmp_path, spool_dir):
    tokenizer, config, word = side
    text = random_text(random.Random(7), word, 50)
    path = tmp_path / "doc.txt"
    path.write_bytes(text.encode())
    expected = all_ids(text_source(text, tokenizer, config))
    with spool_file(path, tokenizer, config) as from_path, \
            spool_file(io.BytesIO(text.encode()), tokenizer, config) as from_stream:
        np.testing.assert_array_equal(all_ids(from_path), expected)
        np.testing.assert_array_equal(all_ids(from_stream), expected)


def test_special_tokens_are_stripped_by_both_sources(encoder_side, spool_dir):
    tokenizer, config = encoder_side
    text = "[CLS] w1 w2 [SEP] w3 [PAD] [PAD] w4 [SEP]"
    assert set(whole_ids(text, tokenizer)) & set(config.strip_token_ids)
    expected = [tokenizer.token_to_id(w) for w in ("w1", "w2", "w3", "w4")]
    assert all_ids(text_source(text, tokenizer, config)).tolist() == expected
    with spool_file(io.BytesIO(text.encode()), tokenizer, config) as source:
        assert all_ids(source).tolist() == expected


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")


@needs_proc
def test_spooled_tokens_leave_no_file_even_while_open(encoder_side, spool_dir):
    # The spool file has no name at all, so not even SIGKILL can leave it behind.
    tokenizer, config = encoder_side
    before = open_descriptors()
    source = spool_file(io.BytesIO(b"w1 w2 w3"), tokenizer, config)
    assert list(spool_dir.iterdir()) == []
    assert open_descriptors() == before + 1
    assert all_ids(source).tolist() == [tokenizer.token_to_id(w) for w in ("w1", "w2", "w3")]
    source.close()
    assert open_descriptors() == before
    source.close()  # closing twice is harmless
    with spool_file(io.BytesIO(b"w1 w2"), tokenizer, config) as source:
        assert len(source) == 2 and list(spool_dir.iterdir()) == []
    assert open_descriptors() == before and list(spool_dir.iterdir()) == []


@needs_proc
def test_spooled_source_closes_its_file_on_error(encoder_side, spool_dir):
    tokenizer, config = encoder_side
    data = b"w1 w2 " * 50 + b"\xff w3"
    before = open_descriptors()
    with pytest.raises(InputError):
        SpooledSource(tokenize_chunks(text_chunks(io.BytesIO(data), "t", 8), tokenizer),
                      config)
    assert open_descriptors() == before and list(spool_dir.iterdir()) == []


def test_sources_keep_the_head_of_max_n_segments(encoder_side, spool_dir):
    tokenizer, config = encoder_side
    capped = dataclasses.replace(config, max_n_segments=2)
    words = [f"w{i % 45}" for i in range(37)]
    full = [tokenizer.token_to_id(w) for w in words]
    head = full[: 2 * config.segment_size]
    assert len(head) < len(full)
    text = " ".join(words)
    assert all_ids(text_source(text, tokenizer, capped)).tolist() == head
    assert all_ids(ArraySource(full, capped)).tolist() == head
    with SpooledSource(tokenize_chunks(text_chunks(io.BytesIO(text.encode()), "t", 5),
                                       tokenizer), capped) as source:
        assert len(source) == len(head)
        assert all_ids(source).tolist() == head
    # shorter than the cap: everything is kept
    assert all_ids(ArraySource(full[:15], capped)).tolist() == full[:15]
    # without a cap: everything
    assert all_ids(ArraySource(full, config)).tolist() == full


def test_array_source_accepts_integer_ids_in_range(encoder_side):
    _, config = encoder_side
    top = config.vocab_size - 1
    for ids in ([5, 6, top], np.array([5, 6, top], dtype=np.int32),
                np.array([5, 6, top], dtype=np.uint8), (5, 6, top)):
        assert all_ids(ArraySource(ids, config)).tolist() == [5, 6, top]


@pytest.mark.parametrize("ids", [
    np.zeros((2, 3), dtype=np.int64),
    [[5, 6], [7, 8]],
    np.int64(5),
    [5.0, 6.0],
    np.array([5, 6], dtype=np.float32),
    ["w1", "w2"],
])
def test_array_source_refuses_non_1d_or_non_integer(encoder_side, ids):
    _, config = encoder_side
    with pytest.raises(InputError) as error:
        ArraySource(ids, config)
    assert "1-D" in one_line(error)


@pytest.mark.parametrize("bad", [-1, 53, 10_000])
def test_array_source_refuses_ids_outside_the_vocabulary(encoder_side, bad):
    _, config = encoder_side
    assert config.vocab_size == 53
    with pytest.raises(InputError) as error:
        ArraySource([5, bad, 6], config)
    message = one_line(error)
    assert f"[0, {config.vocab_size})" in message and str(bad) in message


# -- ids from the tokenizer ---------------------------------------------------------------


def test_ids_past_the_vocabulary_from_the_tokenizer_are_refused(encoder_side, spool_dir):
    tokenizer, config = encoder_side
    bigger = Tokenizer.from_str(tokenizer.to_str())
    bigger.add_tokens([f"extra{i}" for i in range(10)])
    top = bigger.token_to_id("extra9")
    assert top >= config.vocab_size
    text = "w1 w2 " * 30 + "extra9 w3"
    expected = f"token id {top} from the tokenizer is outside the model's vocabulary " \
               f"[0, {config.vocab_size})"
    with pytest.raises(InputError) as error:
        text_source(text, bigger, config)
    assert expected in one_line(error) and "re-export" in one_line(error)
    with pytest.raises(InputError) as error:
        spool_file(io.BytesIO(text.encode()), bigger, config)
    assert expected in one_line(error)
    assert list(spool_dir.iterdir()) == []
    # ids below the top are read as they are
    assert len(text_source("w1 w2 w3", bigger, config)) == 3


@pytest.mark.parametrize(("text", "where"), [
    ("abc\ud800def", 3), ("\udfff", 0), ("w1 w2 \ud83d\ude00", 6)])
def test_text_with_surrogates_is_refused(encoder_side, text, where):
    tokenizer, config = encoder_side
    with pytest.raises(InputError) as error:
        text_source(text, tokenizer, config)
    message = one_line(error)
    assert f"surrogate at character {where}" in message and "Unicode" in message
    with pytest.raises(InputError) as error:
        TextStream(tokenizer).feed(text)
    assert one_line(error) == message
