"""Input to token ids in fixed memory and linear time: text is read in chunks cut at word
boundaries, tokenized, stripped of special tokens and spooled to an anonymous temporary
file of int32 ids, so a run over millions of tokens holds only the segment it is working
on."""

from __future__ import annotations

import codecs
import functools
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
from tokenizers import Tokenizer

from rmt_deploy.errors import InputError
from rmt_deploy.runtime.tokenizer_family import ChunkedTokenizer, chunked_tokenizer
from rmt_deploy.segmentation import strip_special, usable_tokens
from rmt_deploy.spec import RMTConfig

CHUNK_BYTES = 16384  # small: a tokenizer holds ~100 bytes per token of a chunk; measured flat RSS
#: The longest run without a word end that is kept whole; any tokenizer's words are far
#: shorter (WordPiece makes a word of over 100 characters [UNK]).
MAX_WORD_CHARS = 1 << 16

#: Whitespace every tokenizer splits words at: the characters ``str.isspace`` accepts but
#: the controls that count as spaces to Python (form feed, vertical tab, U+001C-U+001F,
#: U+0085), which BERT-style normalizers delete, joining the words around them. A regex
#: character class; a test checks it against every code point.
_BREAKS = "\t\n\r \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WORD_END = re.compile(rf"\S[{_BREAKS}]")  # a word end is at the break
_WORD_END_REVERSED = re.compile(rf"[{_BREAKS}]\S")  # the same, on reversed text
_SPACE_PAIR = re.compile(r"\s\s")
_SURROGATE = re.compile("[\ud800-\udfff]")


def plain_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """``tokenizer`` with its own truncation and padding turned off: the runtime segments
    inputs of any length itself, and a file's truncation (128 tokens in
    sentence-transformers models) would silently drop text."""
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def manifest_tokenizer(manifest) -> Tokenizer | None:
    """The export's tokenizer, plain (see :func:`plain_tokenizer`); None if it has none."""
    if not manifest.tokenizer:
        return None
    data = manifest.read_bytes(manifest.tokenizer["file"])
    return plain_tokenizer(Tokenizer.from_str(data.decode("utf-8")))


class TokenSource(Protocol):
    """A document's cleaned token ids, readable by range."""

    def __len__(self) -> int: ...

    def tokens(self, start: int, end: int) -> np.ndarray: ...


class ArraySource:
    """Token ids already in memory."""

    def __init__(self, ids: Sequence[int] | np.ndarray, config: RMTConfig) -> None:
        array = np.asarray(ids)
        if array.ndim == 1 and array.size == 0:
            array = array.astype(np.int64)  # numpy reads [] as float64; it has no tokens
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise InputError(f"token ids must be a 1-D sequence of integers, got an array of "
                             f"shape {array.shape} and dtype {array.dtype}")
        if array.size and (array.min() < 0 or array.max() >= config.vocab_size):
            raise InputError(f"token ids must lie in [0, {config.vocab_size}); got values "
                             f"from {array.min()} to {array.max()}: wrong tokenizer?")
        stripped = strip_special(array, config)
        self._ids = stripped[: usable_tokens(len(stripped), config)]

    def __len__(self) -> int:
        return len(self._ids)

    def tokens(self, start: int, end: int) -> np.ndarray:
        return self._ids[start:end]


class TokenSpool:
    """An anonymous temporary file holding the int32 token ids of any number of
    documents one after another, so a batch of files holds one descriptor however many
    documents it has. The file has no name, so nothing is left behind even if the
    process is killed; it is made at the first write. Reads and writes go by offset, so
    documents never move each other's position."""

    def __init__(self) -> None:
        self._file = None
        self._end = 0  # bytes of complete documents

    def write(self, pieces: Iterable[np.ndarray], config: RMTConfig) -> tuple[int, int]:
        """Append a document's ids, cleaned; returns its first id's index and its id
        count. A document that fails part-way leaves nothing (its bytes are overwritten
        by the next)."""
        if self._file is None:
            self._file = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        start, end = self._end, self._end
        for piece in pieces:
            check_tokenizer_ids(piece, config)
            data = strip_special(piece, config).astype(np.int32).tobytes()
            _write_at(self._file.fileno(), data, end)
            end += len(data)
        self._end = end
        return start // 4, usable_tokens((end - start) // 4, config)

    def read(self, start: int, count: int) -> np.ndarray:
        """``count`` ids from id index ``start``."""
        data = os.pread(self._file.fileno(), count * 4, start * 4) if count else b""
        return np.frombuffer(data, dtype=np.int32).astype(np.int64)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> TokenSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_at(descriptor: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(descriptor, view, offset)
        view, offset = view[written:], offset + written


class SpooledSource:
    """Token ids spooled to a :class:`TokenSpool` while the text is tokenized: its own,
    closed with it, or one shared by a batch (closed by its owner)."""

    def __init__(self, pieces: Iterable[np.ndarray], config: RMTConfig,
                 spool: TokenSpool | None = None) -> None:
        self._spool = spool if spool is not None else TokenSpool()
        self._owned = spool is None
        try:
            self._start, self._count = self._spool.write(pieces, config)
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return self._count

    def tokens(self, start: int, end: int) -> np.ndarray:
        end = min(end, self._count)
        start = min(start, end)
        return self._spool.read(self._start + start, end - start)

    def close(self) -> None:
        if self._owned:
            self._spool.close()

    def __enter__(self) -> SpooledSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_tokenizer_ids(ids: np.ndarray, config: RMTConfig) -> None:
    """Raise InputError if the tokenizer gave an id outside the model's vocabulary."""
    if ids.size and ids.max() >= config.vocab_size:
        raise InputError(f"token id {ids.max()} from the tokenizer is outside the model's "
                         f"vocabulary [0, {config.vocab_size}): the tokenizer does not belong "
                         "to this model; re-export it")


#: Whether text may be cut between its two sides (see ``ChunkedTokenizer.can_cut``).
CutCheck = Callable[[str, str], bool]


class WordCutter:
    """Text pushed in pieces of any size, handed back in chunks that end where a word ends
    (a non-space character followed by whitespace in ``_BREAKS``) and ``can_cut`` agrees
    (the tokenizer splits there), so tokenizing chunk by chunk equals tokenizing the whole
    text; the text after the last cut is held.

    A run of over ``MAX_WORD_CHARS`` characters without a word end is cut anyway, between
    its last two whitespace characters in a row within reach, else after ``MAX_WORD_CHARS``
    characters, so the held text stays small: such a run is tokenized in pieces, but no
    tokenizer has words that long. Where the text is cut depends on the text alone, not on
    how it is pushed, and each character is scanned a fixed number of times."""

    def __init__(self, held: str = "", can_cut: CutCheck | None = None) -> None:
        self._parts = [held] if held else []  # joined only when read or cut
        self._size = len(held)
        self._can_cut = can_cut

    @property
    def held(self) -> str:
        """The text after the last cut: ``WordCutter(held)`` goes on as this one does."""
        text = "".join(self._parts)
        self._parts = [text] if text else []
        return text

    def push(self, text: str) -> list[str]:
        """The chunks ``text`` completes."""
        chunks: list[str] = []
        for start in range(0, len(text), MAX_WORD_CHARS):
            chunks += self._push(text[start : start + MAX_WORD_CHARS])
        return chunks

    def finish(self) -> list[str]:
        """The chunks of the held text: the text ends here."""
        chunks = self._cut_long()
        if self._size:
            chunks.append(self._release())
        return chunks

    def _push(self, text: str) -> list[str]:
        # text has at most MAX_WORD_CHARS characters, so only the run before its first
        # word end can be too long.
        ends = _word_ends(self._parts[-1][-1] if self._parts else "", text)
        if ends and self._can_cut is not None:
            ends = self._last_cut(text, ends[0])
        first, last = ends or (len(text), len(text))
        self._hold(text[:first])
        chunks = self._cut_long()
        if ends:
            self._hold(text[first:last])
            chunks.append(self._release())
        self._hold(text[last:])
        return chunks

    def _last_cut(self, text: str, first: int) -> tuple[int, int] | None:
        """``first`` and the last word end in ``text`` that ``can_cut`` accepts, if any."""
        before = self._parts[-1][-1] if self._parts else ""
        edge = before + text
        for match in _WORD_END_REVERSED.finditer(edge[::-1]):
            end = len(edge) - 1 - match.start() - len(before)
            left = text[:end] if end >= 64 else self.held[-64:] + text[:end]
            if self._can_cut(left, text[end:]):
                return first, end
        return None

    def _hold(self, text: str) -> None:
        if text:
            self._parts.append(text)
            self._size += len(text)

    def _release(self) -> str:
        text = self.held
        self._parts, self._size = [], 0
        return text

    def _cut_long(self) -> list[str]:
        """Chunks cut off the held text (which has no word end) while it is too long."""
        if self._size <= MAX_WORD_CHARS:
            return []
        held, start, chunks = self.held, 0, []
        while len(held) - start > MAX_WORD_CHARS:
            window = held[start : start + MAX_WORD_CHARS + 1]
            pair = _SPACE_PAIR.search(window[::-1])
            cut = start + (len(window) - 1 - pair.start() if pair else MAX_WORD_CHARS)
            chunks.append(held[start:cut])
            start = cut
        self._parts, self._size = [], 0
        self._hold(held[start:])
        return chunks


def _word_ends(before: str, text: str) -> tuple[int, int] | None:
    """Indexes in ``text`` of its first and last word ends (None if it has none);
    ``before`` is the character before ``text``, or ""."""
    edge = before + text
    first = _WORD_END.search(edge)
    if first is None:
        return None
    last = len(edge) - 1 - _WORD_END_REVERSED.search(edge[::-1]).start()
    return first.start() + 1 - len(before), last - len(before)


def word_chunks(pieces: Iterable[str], can_cut: CutCheck | None = None) -> Iterator[str]:
    """The chunks a :class:`WordCutter` cuts the text made of ``pieces`` into."""
    cutter = WordCutter(can_cut=can_cut)
    for piece in pieces:
        yield from cutter.push(piece)
    yield from cutter.finish()


def text_chunks(stream: BinaryIO, name: str, chunk_bytes: int = CHUNK_BYTES,
                can_cut: CutCheck | None = None) -> Iterator[str]:
    """UTF-8 text in chunks that end where a word ends, as :class:`WordCutter` cuts, so
    tokenizing chunk by chunk equals tokenizing the whole text."""
    seen_text = False
    for chunk in word_chunks(_utf8_blocks(stream, name, chunk_bytes), can_cut):
        seen_text = seen_text or not chunk.isspace()
        yield chunk
    if not seen_text:
        raise InputError(f"{name}: input is empty; pass a file with text in it")


def _utf8_blocks(stream: BinaryIO, name: str, chunk_bytes: int) -> Iterator[str]:
    """The stream's text block by block; NUL bytes or bad UTF-8 raise InputError."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    while True:
        block = stream.read(chunk_bytes)
        if b"\x00" in block:
            raise InputError(f"{name}: contains NUL bytes, so it looks binary; pass a text file")
        pending = decoder.getstate()[0]  # bytes of a character cut by the previous block
        try:
            text = decoder.decode(block, final=not block)
        except UnicodeDecodeError as error:
            # error.start counts from the pending bytes, which the decoder reads first.
            data = pending + block
            raise InputError(
                f"{name}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
                f"{offset - len(pending) + error.start}); convert it, e.g. iconv -t UTF-8"
            ) from None
        yield text
        if not block:
            return
        offset += len(block)


def check_unicode(text: str) -> None:
    """Raise InputError if ``text`` holds a surrogate, which is not Unicode text (UTF-8
    cannot encode it and tokenizers refuse it)."""
    surrogate = _SURROGATE.search(text)
    if surrogate:
        raise InputError(f"text has an unpaired surrogate at character {surrogate.start()}; "
                         "pass valid Unicode text")


@functools.lru_cache(maxsize=8)
def chunked(tokenizer: Tokenizer) -> ChunkedTokenizer:
    """``tokenizer`` taken apart for chunked reading, once per tokenizer object."""
    return chunked_tokenizer(tokenizer)


class ChunkEncoder:
    """The chunks of one document, in order, to the ids the tokenizer gives the whole
    text: the first chunk as the tokenizer encodes a text's start, the others without
    what it adds at a text's start, the post-processor's special tokens once around it."""

    def __init__(self, tokenizer: Tokenizer, started: bool = False) -> None:
        self._tokenizer = chunked(tokenizer)
        self.started = started  # whether the first chunk was encoded

    def encode(self, chunks: Iterable[str]) -> np.ndarray:
        """The ids of the next chunks of the document."""
        pieces = [np.zeros(0, np.int64)]
        for chunk in chunks:
            if not self.started:
                pieces.append(np.asarray(self._tokenizer.prefix, np.int64))
            tokenizer = self._tokenizer.rest if self.started else self._tokenizer.first
            self.started = True
            pieces.append(np.asarray(tokenizer.encode(chunk, add_special_tokens=False).ids,
                                     np.int64))
        return np.concatenate(pieces)

    def end(self) -> np.ndarray:
        """The ids that close the document."""
        opening = () if self.started else self._tokenizer.prefix
        return np.asarray(opening + self._tokenizer.suffix, np.int64)


def tokenize_chunks(chunks: Iterable[str], tokenizer: Tokenizer) -> Iterator[np.ndarray]:
    """Token ids of a document read in chunks cut as ``cut_check(tokenizer)`` allows."""
    encoder = ChunkEncoder(tokenizer)
    for chunk in chunks:
        yield encoder.encode([chunk])
    yield encoder.end()


def cut_check(tokenizer: Tokenizer) -> CutCheck:
    """Where ``tokenizer``'s text may be cut (see ``ChunkedTokenizer.can_cut``)."""
    return chunked(tokenizer).can_cut


def _encode_text(text: str, tokenizer: Tokenizer) -> np.ndarray:
    encoder = ChunkEncoder(tokenizer)
    ids = encoder.encode(word_chunks([text], cut_check(tokenizer)))
    return np.concatenate([ids, encoder.end()])


def spool_file(path: str | Path | BinaryIO, tokenizer: Tokenizer, config: RMTConfig,
               name: str | None = None, spool: TokenSpool | None = None) -> SpooledSource:
    """Tokenize a text file (or a binary stream such as stdin) into a spooled source, in
    ``spool`` if given (else its own). The file is open only while it is read."""
    if isinstance(path, (str, Path)):
        path = Path(path)
        if path.is_dir():
            raise InputError(f"{path}: is a directory; pass a text file")
        try:
            with open(path, "rb") as stream:
                chunks = text_chunks(stream, str(path), can_cut=cut_check(tokenizer))
                return SpooledSource(tokenize_chunks(chunks, tokenizer), config, spool)
        except FileNotFoundError:
            raise InputError(f"{path}: no such file; check the input path") from None
        except PermissionError:
            raise InputError(f"{path}: permission denied") from None
    chunks = text_chunks(path, name or "<stream>", can_cut=cut_check(tokenizer))
    return SpooledSource(tokenize_chunks(chunks, tokenizer), config, spool)


def text_source(text: str, tokenizer: Tokenizer, config: RMTConfig) -> ArraySource:
    """A source for text held in memory, cut into chunks as a file of it is, so both give
    the same ids."""
    if not isinstance(text, str):
        raise InputError(f"text must be a str, got {type(text).__name__}")
    check_unicode(text)
    if not text or text.isspace():
        raise InputError("text is empty; pass some text")
    ids = _encode_text(text, tokenizer)
    check_tokenizer_ids(ids, config)
    return ArraySource(ids, config)


class TextStream:
    """Text arriving in pieces of any size (str, or UTF-8 bytes cut anywhere), tokenized
    as one text: the pieces go through a :class:`WordCutter`, as ``text_chunks`` cuts a
    file, and its held text waits for more text or ``finish()``."""

    def __init__(self, tokenizer: Tokenizer, tail: str = "", pending: bytes = b"",
                 started: bool = False) -> None:
        self._tokenizer = tokenizer
        self._encoder = ChunkEncoder(tokenizer, started)
        self._cutter = WordCutter(tail, cut_check(tokenizer))
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._decoder.setstate((pending, 0))

    @property
    def tail(self) -> str:
        """Text after the last cut, not tokenized yet (at most ``MAX_WORD_CHARS``
        characters): ``TextStream(tokenizer, tail, pending)`` goes on as this one does."""
        return self._cutter.held

    @property
    def pending(self) -> bytes:
        """Bytes of a UTF-8 character cut by the end of the last piece."""
        return self._decoder.getstate()[0]

    @property
    def started(self) -> bool:
        """Whether text was tokenized: a later chunk goes on the text, it does not start
        one (``TextStream(tokenizer, tail, pending, started)``)."""
        return self._encoder.started

    def feed(self, piece: str | bytes) -> np.ndarray:
        """Token ids of the chunks this piece completes. A piece that is not text raises
        InputError and changes nothing."""
        return self._encoder.encode(self._cutter.push(self._decode(piece)))

    def peek(self) -> np.ndarray:
        """Token ids of the tail as if the text ended here; changes nothing."""
        encoder = ChunkEncoder(self._tokenizer, self.started)
        return np.concatenate([encoder.encode(WordCutter(self.tail).finish()), encoder.end()])

    def finish(self) -> np.ndarray:
        """Token ids of the tail: the text ends here."""
        if self.pending:
            raise InputError(f"the text ends inside a UTF-8 character (bytes "
                             f"{self.pending.hex(' ')}); send the rest of the character")
        return np.concatenate([self._encoder.encode(self._cutter.finish()), self._encoder.end()])

    def _decode(self, piece: str | bytes) -> str:
        if isinstance(piece, str):
            check_unicode(piece)
            if self.pending:
                raise InputError("a str piece follows bytes that end inside a UTF-8 character;"
                                 " send the rest of the character as bytes")
            return piece
        data = bytes(piece)
        if b"\x00" in data:
            raise InputError("the piece contains NUL bytes, so it looks binary; send text")
        state = self._decoder.getstate()
        try:
            return self._decoder.decode(data)
        except UnicodeDecodeError as error:
            self._decoder.setstate(state)
            raw, offset = state[0] + data, error.start - len(state[0])
            where = f"at offset {offset}" if offset >= 0 else "in a character begun before it"
            raise InputError(f"the piece is not UTF-8 text (byte 0x{raw[error.start]:02x} "
                             f"{where}); send UTF-8") from None


#: A document: text, a text file, a binary stream, or token ids.
Document = str | Path | BinaryIO | Sequence[int] | np.ndarray


def document_source(document: Document, tokenizer: Tokenizer | None, config: RMTConfig,
                    stack: ExitStack, what: str = "the document",
                    spool: TokenSpool | None = None) -> TokenSource:
    """The token source of any document; a file is spooled (into ``spool`` if given,
    which a batch shares) and closed with ``stack``. ``what`` names the document in
    errors."""
    if isinstance(document, (str, Path)) or hasattr(document, "read"):
        if tokenizer is None:
            raise InputError("this model has no tokenizer; pass token ids")
        if isinstance(document, str):
            source = text_source(document, tokenizer, config)
        else:
            source = stack.enter_context(spool_file(document, tokenizer, config, spool=spool))
    else:
        try:
            source = ArraySource(document, config)
        except (TypeError, ValueError):
            raise InputError(f"{what}: expected text, a file path or token ids, got "
                             f"{type(document).__name__}") from None
        except InputError as error:
            raise InputError(f"{what}: {error}") from None
    if len(source) == 0:
        raise InputError(f"{what} has no tokens after removing special tokens")
    return source
