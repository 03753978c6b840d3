"""The calibration corpus: documents read from text files or token-id arrays, checked
against the model (tokenizer, vocabulary, amount), with an identity (size and hash)
for the manifest."""

from __future__ import annotations

import hashlib
import math
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tokenizers import Tokenizer

from rmt_deploy.errors import InputError
from rmt_deploy.files import sha256_file
from rmt_deploy.runtime.tokens import ArraySource, TokenSource, TokenSpool, spool_file
from rmt_deploy.segmentation import count_segments
from rmt_deploy.spec import RMTConfig

ID_SUFFIXES = (".npy", ".npz")
MAX_HEADER_BYTES = 10_000  # numpy's own default limit on a .npy header
MAX_UNKNOWN_SHARE = 0.05  # more unknown tokens than this: text in another tokenizer's language


@dataclass(frozen=True)
class CalibrationCorpus:
    """Documents to roll the recurrence over, and what identifies them. Text documents
    are spooled to temporary files: close the corpus (or use it in ``with``)."""

    documents: list[TokenSource]
    source: str
    sha256: str
    _spooled: ExitStack = field(default_factory=ExitStack, repr=False)

    def close(self) -> None:
        self._spooled.close()

    def __enter__(self) -> CalibrationCorpus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tokens(self) -> int:
        return sum(len(document) for document in self.documents)

    def segments(self, config: RMTConfig) -> int:
        return sum(count_segments(len(document), config) for document in self.documents)

    def describe(self, config: RMTConfig) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "documents": len(self.documents),
                "tokens": self.tokens, "segments": self.segments(config)}


def read_corpus(path: str | Path, config: RMTConfig, tokenizer: Tokenizer | None,
                min_documents: int = 2, min_segments: int = 32) -> CalibrationCorpus:
    """Read calibration documents from ``path``: a text file, a folder of ``*.txt`` files,
    or token ids in ``.npy`` (1-D: one document, 2-D: one per row) / ``.npz`` files."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such calibration file or folder")
    files = _corpus_files(path)
    digest = hashlib.sha256()
    documents: list[TokenSource] = []
    with ExitStack() as spooled:
        spool = spooled.enter_context(TokenSpool())  # one descriptor for all text files
        for file in files:
            digest.update(f"{file.name}\0{sha256_file(file)}\0".encode())
            if file.suffix in ID_SUFFIXES:
                documents.extend(_id_documents(file, config))
            else:
                documents.append(_text_document(file, config, tokenizer, spool))
        corpus = CalibrationCorpus(documents, path.name, digest.hexdigest(), spooled.pop_all())
    try:
        _check_amount(corpus, config, min_documents, min_segments)
    except InputError:
        corpus.close()
        raise
    return corpus


def _corpus_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and (p.suffix == ".txt" or p.suffix in ID_SUFFIXES))
    if not files:
        raise InputError(f"{path}: holds no .txt, .npy or .npz file; put calibration "
                         "documents there (e.g. rmt-demo generate for the demo model)")
    return files


def _text_document(file: Path, config: RMTConfig, tokenizer: Tokenizer | None,
                   spool: TokenSpool) -> TokenSource:
    if tokenizer is None:
        raise InputError(f"{file}: the model has no tokenizer to read text with; give "
                         "token ids (.npy/.npz) instead")
    source = spool_file(file, tokenizer, config, spool=spool)
    unknown = tokenizer.token_to_id(_unknown_token(tokenizer) or "")
    if unknown is not None and len(source):
        share = sum(int((block == unknown).sum()) for block in _blocks(source)) / len(source)
        if share > MAX_UNKNOWN_SHARE:
            raise InputError(f"{file}: {share:.0%} of its tokens are unknown to the model's "
                             "tokenizer; calibrate with text like the model's own input")
    return source


def _unknown_token(tokenizer: Tokenizer) -> str | None:
    return getattr(tokenizer.model, "unk_token", None)


def _blocks(source: TokenSource, size: int = 1 << 16) -> Iterator[np.ndarray]:
    for start in range(0, len(source), size):
        yield source.tokens(start, min(start + size, len(source)))


def _load_arrays(file: Path) -> list[np.ndarray]:
    """The arrays of a .npy or .npz file, each header checked against the bytes that
    follow it before anything is allocated."""
    if file.suffix == ".npy":
        with open(file, "rb") as handle:
            _check_header(handle, file.stat().st_size, file.name)
        return [np.load(file, allow_pickle=False)]
    with zipfile.ZipFile(file) as archive:
        for member in archive.infolist():
            with archive.open(member) as handle:
                _check_header(handle, member.file_size, f"{file.name}:{member.filename}")
    with np.load(file, allow_pickle=False) as loaded:
        return [loaded[key] for key in loaded.files]


def _check_header(handle: BinaryIO, size: int, name: str) -> None:
    """Refuse a .npy whose header promises other than the ``size`` bytes it holds (a
    header claiming 10^12 values in a small file)."""
    version = np.lib.format.read_magic(handle)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"{name}: .npy format version {version} is not supported")
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read(handle, max_header_size=MAX_HEADER_BYTES)
    declared = math.prod(shape) * dtype.itemsize
    held = size - handle.tell()
    if declared != held:
        raise ValueError(f"{name}: its header declares shape {tuple(shape)} ({declared:,} "
                         f"bytes) but {held:,} bytes follow it")


def _id_documents(file: Path, config: RMTConfig) -> list[TokenSource]:
    try:
        arrays = _load_arrays(file)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise InputError(f"{file}: not a readable numpy file of token ids ({str(error)[:160]})"
                         "; save token ids with numpy.save / numpy.savez") from None
    documents = []
    for array in arrays:
        if array.ndim not in (1, 2) or not np.issubdtype(array.dtype, np.integer):
            raise InputError(f"{file}: token ids must be integers shaped [tokens] or "
                             f"[documents, tokens]; got shape {array.shape}, dtype {array.dtype}")
        rows = array if array.ndim == 2 else array[None]
        try:
            documents.extend(ArraySource(row, config) for row in rows)
        except InputError as error:
            raise InputError(f"{file}: {error}") from None
    return documents


def _check_amount(corpus: CalibrationCorpus, config: RMTConfig, min_documents: int,
                  min_segments: int) -> None:
    documents = [d for d in corpus.documents if len(d)]
    segments = corpus.segments(config)
    if len(documents) < min_documents or segments < min_segments:
        raise InputError(
            f"calibration data {corpus.source} has {len(documents)} document(s) with tokens "
            f"and {segments} segment(s); at least {min_documents} documents and "
            f"{min_segments} segments are needed (some are held out to judge the INT8 "
            "graph): add documents, ideally longer than the model's training length")
