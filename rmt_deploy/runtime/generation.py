"""Generation after a document, with a KV cache: the last segment is read once as
``[memory ; tokens]`` without write slots (prefill), then each new token costs one
token's work (decode). Greedy by default; temperature, top-k and top-p sampling, seeded."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from rmt_deploy.contract import context_slots
from rmt_deploy.errors import InputError
from rmt_deploy.runtime.backends.base import EngineState
from rmt_deploy.runtime.scoring import softmax
from rmt_deploy.segmentation import step_inputs
from rmt_deploy.spec import RMTConfig


@dataclass(frozen=True)
class GenerationOptions:
    """What to generate after each document."""

    max_new_tokens: int  # at most this many tokens; a row stops at the EOS token
    temperature: float = 0.0  # 0: greedy (argmax); > 0: sample from softmax(logits / T)
    top_k: int = 0  # sampling: only the k most likely tokens (0: all)
    top_p: float = 1.0  # sampling: of those, the fewest whose probability reaches p
    seed: int | None = None  # sampling: the random stream (None: fresh each call)

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive int, got "
                             f"{self.max_new_tokens!r}")
        if self.temperature != 0 and not (math.isfinite(self.temperature)
                                          and self.temperature >= sys.float_info.min):
            raise InputError(f"temperature must be 0 (greedy) or a positive finite number of "
                             f"at least {sys.float_info.min:.1e}, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an int >= 0 (0: no limit), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(
                self.seed, int) or self.seed < 0):
            raise InputError(f"seed must be None or an int >= 0, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class TokenChooser:
    """Picks each row's next token from its logits, as the options say."""

    def __init__(self, options: GenerationOptions) -> None:
        self.options = options
        self._rng = np.random.default_rng(options.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if self.options.greedy:
            return logits.argmax(axis=-1)
        return np.array([self._sample(row) for row in logits], dtype=np.int64)

    def _sample(self, logits: np.ndarray) -> int:
        options = self.options
        logits = logits.astype(np.float64)
        with np.errstate(over="ignore"):  # from the maximum: 0 at most, -inf harmless
            probabilities = softmax((logits - logits.max()) / options.temperature)
        order = np.argsort(-probabilities, kind="stable")
        if options.top_k:
            order = order[: options.top_k]
        if options.top_p < 1:  # of the top k, renormalized (as Hugging Face chains them)
            cumulative = np.cumsum(probabilities[order])
            order = order[: int(np.searchsorted(cumulative, options.top_p * cumulative[-1])) + 1]
        kept = probabilities[order]
        return int(order[self._rng.choice(len(order), p=kept / kept.sum())])


def check_room(config: RMTConfig, width: int, options: GenerationOptions) -> None:
    """Refuse a generation that would run past the base model's positions."""
    limit, slots = config.max_positions, context_slots(config)
    if limit is not None and slots + width + options.max_new_tokens - 1 > limit:
        raise InputError(
            f"cannot generate {options.max_new_tokens} tokens: the last segment would exceed "
            f"the model's {limit} positions; ask for at most {limit - slots - width + 1}")


def generate(state: EngineState, config: RMTConfig, segments: Sequence[np.ndarray],
             options: GenerationOptions,
             on_logits: Callable[[np.ndarray], None] | None = None,
             on_tokens: Callable[[np.ndarray], None] | None = None,
             choose: TokenChooser | None = None) -> list[list[int]]:
    """Each row of ``state`` generates after its segment ``segments[row]`` (content
    tokens), from the row's memory; rows stop at the EOS token (kept) or after
    ``max_new_tokens``. ``on_logits`` sees every step's logits [rows, vocab],
    ``on_tokens`` every step's chosen tokens [rows] as they are made (a row that has
    stopped still has one: ignore it). ``choose``: a chooser to go on with (its random
    stream continues), else a new one from ``options``."""
    input_ids, attention_mask = step_inputs(segments, config)
    check_room(config, input_ids.shape[1], options)
    slots = context_slots(config)
    capacity = slots + input_ids.shape[1] + options.max_new_tokens - 1
    logits, cache = state.prefill(input_ids, attention_mask, capacity)
    attended = np.concatenate([np.ones((len(segments), slots), np.int64),
                               attention_mask], axis=1)
    choose = choose or TokenChooser(options)
    generated: list[list[int]] = [[] for _ in segments]
    done = np.zeros(len(segments), dtype=bool)
    for count in range(1, options.max_new_tokens + 1):
        if on_logits is not None:
            on_logits(logits)
        tokens = choose(logits)
        for row, token in enumerate(tokens.tolist()):
            if not done[row]:
                generated[row].append(token)
                done[row] = token == config.eos_token_id
        if on_tokens is not None:
            on_tokens(tokens)
        if done.all() or count == options.max_new_tokens:
            break
        attended = np.concatenate([attended, np.ones((len(segments), 1), np.int64)], axis=1)
        logits, cache = state.decode(cache, tokens[:, None].astype(np.int64), attended)
    return generated
