"""Word-level fact-memorization task from "Scaling Transformer to 1M tokens and beyond with RMT".

A sample is a fact (``mary went to the kitchen .``), a long stretch of noise sentences that
never mention a person or a place, and a question (``where is mary ?``); the label is the
index of the fact's place in :data:`LABELS`. In ``"memorize"`` mode the fact opens the
sample; in ``"detect"`` mode (detect-and-memorize) it sits at a random sentence boundary
inside the noise. Everything is deterministic given a ``numpy.random.Generator``.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from rmt_deploy.files import atomic_path

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))

NAMES = (
    "mary", "john", "daniel", "sandra", "fred", "bill",
    "julie", "jeff", "emily", "lily", "brian", "greg",
)  # fmt: skip
LABELS = ("bathroom", "hallway", "garden", "office", "bedroom", "kitchen")
FUNCTION_WORDS = ("went", "to", "the", "where", "is", "?", ".", "a")
DETERMINERS = (
    "this", "that", "every", "some", "one", "each", "another",
    "his", "her", "their", "our", "my", "your",
)  # fmt: skip
NOUNS = (
    "ball", "book", "box", "car", "cat", "chair", "clock", "coat", "cup", "desk",
    "dog", "door", "egg", "fish", "flower", "fork", "hat", "horse", "key", "kite",
    "lamp", "leaf", "letter", "map", "milk", "moon", "note", "pen", "pencil", "phone",
    "picture", "plate", "radio", "ring", "rock", "rope", "shoe", "sock", "spoon", "star",
    "stone", "table", "tree", "truck", "wall", "watch", "window", "apple", "banana", "bread",
    "cake", "cheese", "bottle", "bag", "basket", "bell", "bicycle", "boat", "bowl", "bucket",
    "candle", "coin", "drum", "feather", "football", "glass", "guitar", "hammer", "jacket",
    "kettle", "ladder", "mirror", "needle", "pillow", "pot", "rabbit", "river", "road",
    "sandwich", "scarf", "shirt", "song", "story", "sugar", "ticket", "towel", "train",
    "umbrella", "violin", "wheel",
)  # fmt: skip
VERBS = (
    "found", "saw", "took", "dropped", "moved", "carried", "held", "liked", "painted",
    "pushed", "pulled", "cleaned", "washed", "opened", "closed", "broke", "fixed", "kicked",
    "threw", "caught", "touched", "hid", "lost", "bought", "sold", "borrowed", "wanted",
    "needed", "watched", "followed", "chased", "admired", "noticed", "remembered", "forgot",
    "grabbed", "lifted", "built", "drew", "wrapped", "counted", "weighed", "shook", "covered",
    "hit", "filled", "emptied", "turned", "dried", "polished",
)  # fmt: skip
ADJECTIVES = (
    "red", "blue", "green", "yellow", "black", "white", "brown", "grey", "purple", "pink",
    "big", "small", "tiny", "huge", "old", "new", "young", "heavy", "light", "soft",
    "hard", "round", "square", "long", "short", "tall", "warm", "cold", "hot", "wet",
    "dry", "clean", "dirty", "shiny", "dull", "quiet", "loud", "happy", "sad", "funny",
    "strange", "bright", "dark", "empty", "full", "fresh", "sweet", "sharp", "smooth", "rough",
)  # fmt: skip
PREPOSITIONS = (
    "on", "in", "under", "near", "behind", "beside", "above", "below", "with",
    "by", "from", "into", "onto", "over", "past", "across", "inside", "outside",
)  # fmt: skip

VOCAB: tuple[str, ...] = (
    SPECIAL_TOKENS + NAMES + LABELS + FUNCTION_WORDS + DETERMINERS
    + NOUNS + VERBS + ADJECTIVES + PREPOSITIONS
)  # fmt: skip
TOKEN_TO_ID: dict[str, int] = {word: i for i, word in enumerate(VOCAB)}
NAME_IDS = np.array([TOKEN_TO_ID[w] for w in NAMES], dtype=np.int64)
LABEL_IDS = np.array([TOKEN_TO_ID[w] for w in LABELS], dtype=np.int64)

MODES = ("memorize", "detect")
FACT_LEN = 6  # <name> went to the <place> .
QUESTION_LEN = 4  # where is <name> ?
MIN_TOKENS = FACT_LEN + QUESTION_LEN
WORDS_PER_LINE = 20

_VOCAB_ARRAY = np.array(VOCAB, dtype=object)
_LINES_PER_CHUNK = 2000  # 40k words (~250 kB of text) per write when streaming to disk


def _ids(words: tuple[str, ...]) -> np.ndarray:
    return np.array([TOKEN_TO_ID[w] for w in words], dtype=np.int64)


# Noise grammar as 11 slots: DET (ADJ) NOUN VERB DET (ADJ) NOUN [PREP DET NOUN] .
_DET_IDS = _ids(("the", "a") + DETERMINERS)
_SLOT_POOLS = (
    _DET_IDS, _ids(ADJECTIVES), _ids(NOUNS), _ids(VERBS), _DET_IDS, _ids(ADJECTIVES),
    _ids(NOUNS), _ids(PREPOSITIONS), _DET_IDS, _ids(NOUNS), _ids((".",)),
)  # fmt: skip
_SLOT_SIZES = np.array([len(p) for p in _SLOT_POOLS], dtype=np.int64)
_SLOT_OFFSETS = np.concatenate(([0], np.cumsum(_SLOT_SIZES)[:-1]))
_SLOT_WORDS = np.concatenate(_SLOT_POOLS)
_MIN_SENTENCE_LEN = 6


def build_tokenizer() -> Tokenizer:
    """Word-level tokenizer over :data:`VOCAB` (lowercasing, whitespace+punctuation split)."""
    tok = Tokenizer(models.WordLevel(vocab=dict(TOKEN_TO_ID), unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.no_padding()
    tok.no_truncation()
    return tok


def tokenizer_json() -> str:
    """The tokenizer of :func:`build_tokenizer` serialized as ``tokenizer.json`` text."""
    return build_tokenizer().to_str()


def ids_to_text(ids: np.ndarray) -> str:
    """Decode token ids to words joined by single spaces (inverse of the tokenizer)."""
    return " ".join(_VOCAB_ARRAY[np.asarray(ids, dtype=np.int64)].tolist())


def _check_count(value: int, what: str, minimum: int, hint: str) -> int:
    try:
        count = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None
    if count < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {count}; {hint}")
    return count


def _check_n_tokens(n_tokens: int) -> int:
    return _check_count(
        n_tokens, "n_tokens", MIN_TOKENS,
        f"a sample needs {FACT_LEN} fact tokens plus {QUESTION_LEN} question tokens",
    )  # fmt: skip


def _check_n_samples(n_samples: int) -> int:
    return _check_count(n_samples, "n_samples", 1, "ask for at least one sample")


@dataclass(frozen=True)
class MemorizeTask:
    """Fact-memorization sample generator.

    ``mode`` is ``"memorize"`` (fact first) or ``"detect"`` (fact at a random sentence
    boundary in the noise); ``adj_prob`` and ``pp_prob`` are the chances that a noise
    sentence carries each optional adjective and the trailing prepositional phrase.
    """

    mode: str = "memorize"
    adj_prob: float = 0.5
    pp_prob: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        for field in ("adj_prob", "pp_prob"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{field} must be a probability in [0, 1], got {value!r}")

    def _noise(self, n_noise: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n_noise`` noise ids and the sentence boundaries (0 and each complete end)."""
        n_sent = -(-n_noise // _MIN_SENTENCE_LEN)
        words = _SLOT_WORDS[_SLOT_OFFSETS + rng.integers(0, _SLOT_SIZES, size=(n_sent, 11))]
        optional = rng.random((n_sent, 3)) < (self.adj_prob, self.adj_prob, self.pp_prob)
        mask = np.ones((n_sent, 11), dtype=bool)
        mask[:, 1] = optional[:, 0]
        mask[:, 5] = optional[:, 1]
        mask[:, 7:10] = optional[:, 2:3]
        ends = np.cumsum(mask.sum(axis=1))
        boundaries = np.concatenate(([0], ends[ends <= n_noise]))
        return words[mask][:n_noise], boundaries

    def sample_ids(self, n_tokens: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """One sample: int64 token ids of length exactly ``n_tokens`` and its label index."""
        n = _check_n_tokens(n_tokens)
        label = int(rng.integers(len(LABELS)))
        name = NAME_IDS[rng.integers(len(NAMES))]
        noise, boundaries = self._noise(n - MIN_TOKENS, rng)
        pos = 0 if self.mode == "memorize" else int(boundaries[rng.integers(len(boundaries))])
        ids = np.empty(n, dtype=np.int64)
        ids[:pos] = noise[:pos]
        ids[pos : pos + FACT_LEN] = (
            name, TOKEN_TO_ID["went"], TOKEN_TO_ID["to"], TOKEN_TO_ID["the"],
            LABEL_IDS[label], TOKEN_TO_ID["."],
        )  # fmt: skip
        ids[pos + FACT_LEN : n - QUESTION_LEN] = noise[pos:]
        ids[n - QUESTION_LEN :] = (TOKEN_TO_ID["where"], TOKEN_TO_ID["is"], name, TOKEN_TO_ID["?"])
        return ids, label

    def sample_text(self, n_tokens: int, rng: np.random.Generator) -> tuple[str, int]:
        """The sample of :meth:`sample_ids` as space-separated words, and its label index."""
        ids, label = self.sample_ids(n_tokens, rng)
        return ids_to_text(ids), label

    def batch_ids(self, n_samples: int, n_tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``[n_samples, n_tokens]`` int64 ids and ``[n_samples]`` int64 labels from ``seed``."""
        n_samples = _check_n_samples(n_samples)
        n_tokens = _check_n_tokens(n_tokens)
        rng = np.random.default_rng(seed)
        ids = np.empty((n_samples, n_tokens), dtype=np.int64)
        labels = np.empty(n_samples, dtype=np.int64)
        for i in range(n_samples):
            ids[i], labels[i] = self.sample_ids(n_tokens, rng)
        return ids, labels


def _write_atomic(path: Path, chunks: Iterable[str]) -> None:
    """Write text chunks to a temp file beside ``path``, then rename it into place."""
    with atomic_path(path) as temp, open(temp, "w", encoding="utf-8", newline="\n") as f:
        for chunk in chunks:
            f.write(chunk)


def _text_chunks(ids: np.ndarray) -> Iterator[str]:
    """Yield the sample's text, ``WORDS_PER_LINE`` words a line, a bounded chunk at a time."""
    step = WORDS_PER_LINE * _LINES_PER_CHUNK
    for start in range(0, len(ids), step):
        words = _VOCAB_ARRAY[ids[start : start + step]].tolist()
        lines = (
            " ".join(words[i : i + WORDS_PER_LINE]) for i in range(0, len(words), WORDS_PER_LINE)
        )
        yield "\n".join(lines) + "\n"


def write_inputs(
    out_dir: Path, n_samples: int, n_tokens: int, seed: int, mode: str = "memorize"
) -> list[Path]:
    """Write ``sample_00000.txt``... and ``answers.tsv`` (``file<TAB>label``, no header).

    The samples equal the rows of ``MemorizeTask(mode).batch_ids(n_samples, n_tokens, seed)``
    and tokenize back to exactly those ids. Returns the sample file paths in order.
    """
    task = MemorizeTask(mode)
    n_samples = _check_n_samples(n_samples)
    n_tokens = _check_n_tokens(n_tokens)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, answers = [], []
    for i in range(n_samples):
        ids, label = task.sample_ids(n_tokens, rng)
        path = out_dir / f"sample_{i:05d}.txt"
        _write_atomic(path, _text_chunks(ids))
        paths.append(path)
        answers.append(f"{path.name}\t{LABELS[label]}\n")
    _write_atomic(out_dir / "answers.tsv", answers)
    return paths
