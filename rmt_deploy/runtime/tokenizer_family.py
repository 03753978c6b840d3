"""What chunked tokenizing must know about a tokenizer to equal tokenizing the whole text,
read from the tokenizer's own structure (its ``tokenizer.json`` components), not its name:

- where it may be cut: where its pre-tokenizer splits (byte-level BPE in the Llama 3
  style joins punctuation with the newlines after it, a Metaspace pre-tokenizer splits at
  spaces only); a tokenizer whose pre-tokenizer does not split words (none, as in
  Llama-2-style files whose normalizer marks spaces, or ``Metaspace(split=False)``) is cut
  only before a space, where its sentencepiece-style words start;
- what it adds at the start of a text (a ``Prepend`` normalizer, a Metaspace or
  byte-level prefix space), which a chunk after the first must not get;
- the special tokens its post-processor adds around a text (a Llama 3 BOS, BERT's
  ``[CLS]``/``[SEP]``), which go once around the document, not around each chunk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tokenizers import Tokenizer

#: Characters of context before a cut that its check pre-tokenizes: more than any
#: pre-tokenizer looks back.
_CONTEXT_CHARS = 32


@dataclass(frozen=True)
class ChunkedTokenizer:
    """A tokenizer taken apart for chunked reading (see the module docstring)."""

    first: Tokenizer  # encodes the document's first chunk
    rest: Tokenizer  # encodes every later chunk: adds nothing at the start
    prefix: tuple[int, ...]  # special ids the post-processor puts before a text
    suffix: tuple[int, ...]  # ... and after it
    splits_words: bool  # its pre-tokenizer splits "a b"; else cut only before a space

    def can_cut(self, before: str, after: str) -> bool:
        """Whether text may be cut between ``before`` (ending with a non-space) and
        ``after`` (starting with whitespace) without changing its tokens."""
        if not self.splits_words:
            return after[:1] == " "
        left = before[-_CONTEXT_CHARS:]
        pieces = self.first.pre_tokenizer.pre_tokenize_str(left + after[:1])
        return not any(start < len(left) < end for _, (start, end) in pieces)


def chunked_tokenizer(tokenizer: Tokenizer) -> ChunkedTokenizer:
    """``tokenizer`` taken apart for chunked reading."""
    rest = json.loads(tokenizer.to_str())
    rest["normalizer"] = _without_prepend(rest.get("normalizer"))
    rest["pre_tokenizer"] = _without_prefix_space(rest.get("pre_tokenizer"))
    prefix, suffix = _around(tokenizer)
    pre_tokenizer = tokenizer.pre_tokenizer
    splits = pre_tokenizer is not None and len(pre_tokenizer.pre_tokenize_str("a b")) > 1
    return ChunkedTokenizer(tokenizer, Tokenizer.from_str(json.dumps(rest)), prefix, suffix,
                            splits)


def _around(tokenizer: Tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The special ids the post-processor puts before and after a text: around the
    content of the first probe text that has any (all before, if none has)."""
    for probe in ("a", "0", ".", "\u4e00"):
        encoding = tokenizer.encode(probe)
        content = [i for i, special in enumerate(encoding.special_tokens_mask) if not special]
        if content:
            return tuple(encoding.ids[: content[0]]), tuple(encoding.ids[content[-1] + 1 :])
    return tuple(tokenizer.encode("").ids), ()


def _without_prepend(normalizer: dict | None) -> dict | None:
    """The normalizer without its ``Prepend`` steps."""
    if normalizer is None or normalizer["type"] == "Prepend":
        return None
    if normalizer["type"] == "Sequence":
        steps = [step for step in map(_without_prepend, normalizer["normalizers"]) if step]
        return {**normalizer, "normalizers": steps} if steps else None
    return normalizer


def _without_prefix_space(pre_tokenizer: dict | None) -> dict | None:
    """The pre-tokenizer adding no space or space marker at the start of a text."""
    if pre_tokenizer is None:
        return None
    kind = pre_tokenizer["type"]
    if kind == "Sequence":
        return {**pre_tokenizer, "pretokenizers": [
            _without_prefix_space(step) for step in pre_tokenizer["pretokenizers"]]}
    if kind == "Metaspace":
        changed = {**pre_tokenizer, "prepend_scheme": "never"}
        if "add_prefix_space" in changed:
            changed["add_prefix_space"] = False
        return changed
    if kind == "ByteLevel":
        return {**pre_tokenizer, "add_prefix_space": False}
    return pre_tokenizer
