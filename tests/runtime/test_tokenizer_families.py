"""Chunked reading equals whole-text tokenizing for every tokenizer family: WordPiece,
byte-level BPE in the GPT-2 and Llama 3 styles (the latter adds a BOS) and the
sentencepiece-style Metaspace families (Llama-2's ``Prepend`` normalizer, Mistral's
``Metaspace(prepend_scheme="first", split=False)``, T5's ``Metaspace`` with splits,
Gemma's space-replacing normalizer). The tokenizers are tiny ones trained offline."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing

from rmt_deploy.runtime.tokens import TextStream, spool_file, text_source
from rmt_deploy.segmentation import strip_special
from rmt_deploy.spec import RMTConfig

#: Llama 3's pre-tokenizer split: it joins punctuation with the newlines after it.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SAMPLE = ("The cat sat.\n\nOn the mat, it  slept;   then\tit woke!\r\nNaïve café — 日本 😀 ok?\n"
          "Done.  \n  end")
CORPUS = [SAMPLE, "the cat and the dog sat on the mat.", "it slept, then it woke up!",
          "naïve café ok? done. end the end"] * 20


def _bos(tokenizer: Tokenizer, bos: str) -> None:
    tokenizer.add_special_tokens([bos])
    tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))])


def wordpiece() -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(CORPUS, trainers.WordPieceTrainer(
        vocab_size=120, special_tokens=["[UNK]", "[CLS]", "[SEP]"]))
    tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    return tokenizer


def byte_level(llama3: bool) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    if llama3:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if llama3:
        _bos(tokenizer, "<|begin_of_text|>")
    return tokenizer


def metaspace(style: str) -> Tokenizer:
    """A sentencepiece-style BPE trained on space-marked words, then laid out as the
    ``style`` family's ``tokenizer.json`` is."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>"] + [f"<0x{b:02X}>" for b in range(256)]))
    replace = normalizers.Replace(" ", "▁")
    if style == "llama2":  # transformers' older conversion
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace])
        tokenizer.pre_tokenizer = None
    elif style == "mistral":  # its newer conversion
        tokenizer.normalizer = None
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    elif style == "gemma":
        tokenizer.normalizer = replace
        tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Metaspace()
    _bos(tokenizer, "<s>")
    return tokenizer


FAMILIES = {
    "wordpiece": wordpiece,
    "gpt2": lambda: byte_level(llama3=False),
    "llama3": lambda: byte_level(llama3=True),
    "llama2": lambda: metaspace("llama2"),
    "mistral": lambda: metaspace("mistral"),
    "t5": lambda: metaspace("t5"),
    "gemma": lambda: metaspace("gemma"),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request) -> Tokenizer:
    return FAMILIES[request.param]()


def config_of(tokenizer: Tokenizer) -> RMTConfig:
    """A decoder config that keeps every token, special ones included."""
    return RMTConfig.decoder(num_mem_tokens=1, hidden_size=8, segment_size=4, pad_token_id=0,
                             vocab_size=tokenizer.get_vocab_size())


class Pieces(io.RawIOBase):
    """A binary stream whose reads return the given pieces, as a pipe may."""

    def __init__(self, pieces: list[bytes]) -> None:
        self._pieces = [piece for piece in pieces if piece]

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._pieces.pop(0) if self._pieces else b""


def file_ids(pieces: list[bytes], tokenizer: Tokenizer) -> list[int]:
    """What rmt-run reads from a file arriving in ``pieces``."""
    with spool_file(Pieces(pieces), tokenizer, config_of(tokenizer)) as source:
        return source.tokens(0, len(source)).tolist()


def stream_ids(pieces: list[bytes], tokenizer: Tokenizer) -> list[int]:
    """What a stream session reads from ``pieces``, rebuilt from its saved text state
    after each piece as a restored session is."""
    stream, ids = TextStream(tokenizer), []
    for piece in pieces:
        ids += stream.feed(piece).tolist()
        stream = TextStream(tokenizer, stream.tail, stream.pending, stream.started)
    return ids + stream.finish().tolist()


def byte_cuts(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def test_a_file_or_stream_cut_at_every_byte_equals_the_whole_text(family):
    data = SAMPLE.encode()
    expected = family.encode(SAMPLE).ids
    assert file_ids([data], family) == expected
    for cut in range(1, len(data)):
        pieces = byte_cuts(data, [cut])
        assert file_ids(pieces, family) == expected, cut
        assert stream_ids(pieces, family) == expected, cut


@pytest.mark.parametrize("seed", range(3))
def test_random_chunkings_equal_the_whole_text(family, seed):
    rng = random.Random(seed)
    words = SAMPLE.split(" ") + ["\n", ".\n", "\t", "  ", "!\r\n", "é"]
    for _ in range(5):
        text = "".join(rng.choice(words) + rng.choice([" ", "", "\n", "  "])
                       for _ in range(rng.randint(3, 40)))
        data = text.encode()
        expected = family.encode(text).ids
        for _ in range(10):
            pieces = byte_cuts(data, rng.sample(range(1, len(data)), min(len(data) - 1,
                                                                        rng.randint(1, 12))))
            assert file_ids(pieces, family) == expected, (text, pieces)
            assert stream_ids(pieces, family) == expected, (text, pieces)


def test_text_in_memory_equals_the_whole_text(family):
    config = config_of(family)
    source = text_source(SAMPLE, family, config)
    expected = strip_special(family.encode(SAMPLE).ids, config)
    np.testing.assert_array_equal(source.tokens(0, len(source)), expected)


def test_special_tokens_go_once_around_the_document(family):
    """A Llama 3 / Llama-2 BOS, BERT's [CLS] and [SEP], once however the text is cut."""
    ids = stream_ids([SAMPLE[i : i + 5].encode() for i in range(0, len(SAMPLE), 5)], family)
    whole = family.encode(SAMPLE)
    specials = [i for i, special in zip(whole.ids, whole.special_tokens_mask, strict=True)
                if special]
    if not specials:
        pytest.skip("this tokenizer adds no special tokens")
    assert [i for i in ids if i in specials] == specials


@pytest.fixture(scope="module")
def llama2_style_model(tmp_path_factory):
    """The tiny decoder exported with a Llama-2-style tokenizer that fits its 60 ids."""
    from conftest import GPT2_VOCAB, make_decoder

    from rmt_deploy.export.pipeline import ExportOptions, export_checkpoint
    from rmt_deploy.model.checkpoint import save_checkpoint
    from rmt_deploy.runtime import open_model

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=GPT2_VOCAB - 2, special_tokens=["<unk>"], limit_alphabet=40))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                 normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = None
    _bos(tokenizer, "<s>")
    assert tokenizer.get_vocab_size() <= GPT2_VOCAB
    folder = tmp_path_factory.mktemp("llama2-style")
    path = save_checkpoint(make_decoder(), folder / "model.pt", tokenizer.to_str())
    export_checkpoint(path, folder / "export", ExportOptions(validation_segments=2, threads=1))
    return open_model(folder / "export")


@pytest.mark.parametrize("seed", range(3))
def test_a_saved_and_restored_session_reads_a_llama2_style_text_exactly(llama2_style_model,
                                                                          seed):
    model, rng = llama2_style_model, random.Random(seed)
    text = " ".join(rng.choice(SAMPLE.split(" ")) for _ in range(60))
    data = text.encode()
    expected = model.run_one(strip_special(model.tokenizer.encode(text).ids, model.config))
    pieces = byte_cuts(data, rng.sample(range(1, len(data)), 8))
    session = model.session()
    for index, piece in enumerate(pieces):
        session.feed(piece)
        if index == 3:
            session = model.restore_session(session.save())
    result = session.close()
    assert result.tokens == expected.tokens
    assert result.perplexity == pytest.approx(expected.perplexity, rel=1e-6)
    np.testing.assert_allclose(result.memory, expected.memory, rtol=1e-5, atol=1e-6)
