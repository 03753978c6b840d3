"""The runtime's Python API: open a model once, run texts, files or token ids through
it, get typed results. An opened model is safe to use from several threads: every call
keeps its memory in its own backend buffers. It is immutable: what it reads later (graphs
loaded when first used) comes from the files as they were opened."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from rmt_deploy.contract import check_state, reported, state_pairs, window_pairs
from rmt_deploy.errors import InputError, NumericError
from rmt_deploy.runtime.backends.base import State, StepEngine
from rmt_deploy.runtime.generation import GenerationOptions
from rmt_deploy.runtime.loop import last_segments, last_tokens, never, run_segments
from rmt_deploy.runtime.results import (
    DecoderOutput,
    EncoderOutput,
    Run,
    decoder_output,
    encoder_output,
)
from rmt_deploy.runtime.scoring import PerplexityMeter
from rmt_deploy.runtime.selection import BackendChoice, check_seen
from rmt_deploy.runtime.session import StreamSession
from rmt_deploy.runtime.stepper import Stepper
from rmt_deploy.runtime.tokens import Document, TokenSource, TokenSpool, document_source
from rmt_deploy.segmentation import count_segments
from rmt_deploy.spec import RMTConfig

#: ``progress(segments_done, segments_total)``.
Progress = Callable[[int, int], None]


class RMTModel:
    """An RMT ready to run on one backend."""

    def __init__(self, engine: StepEngine, initial_state: Mapping[str, np.ndarray],
                 tokenizer=None, description: str = "",
                 choice: BackendChoice | None = None, identity: str | None = None) -> None:
        """``initial_state``: one row's state a document starts from, every pair the
        contract declares; ``identity``: the model's, as it was opened."""
        self.engine = engine
        self.choice = choice  # which backend and settings, and why (None: given an engine)
        self.config: RMTConfig = engine.config
        self.initial_state: State = check_state(self.config, initial_state, None,
                                                "the initial state")
        self.tokenizer = tokenizer
        self.description = description
        self._identity = identity

    @property
    def backend(self) -> str:
        return self.engine.name

    @property
    def identity(self) -> str:
        """sha256 naming this model, which saved session states are checked against: as
        given when it was opened (``rmt.json``'s for an export: it holds every file's
        sha256, so one identity covers all its graphs and backends; the file's for a
        checkpoint), else of the config and initial state."""
        if self._identity is None:
            self._identity = _identity(self.config, self.initial_state)
        return self._identity

    def session(self, total_tokens: int | None = None) -> StreamSession:
        """A stream session: feed a document in pieces, read its result at any time."""
        return StreamSession(self, total_tokens=total_tokens)

    def restore_session(self, data: bytes) -> StreamSession:
        """A session from ``StreamSession.save()``'s bytes, saved from this model."""
        return StreamSession.restore(self, data)

    def run(self, documents: Sequence[Document], generate: int | GenerationOptions = 0,
            progress: Progress | None = None) -> Run:
        """Run a batch of documents with the authors' per-row semantics. Decoders score
        each document's perplexity, or, with ``generate`` (a token count or
        :class:`GenerationOptions`), generate after it instead: then no segment's logits
        are computed but those generation reads."""
        if isinstance(documents, (str, bytes, bytearray, Path, np.ndarray)) or not isinstance(
                documents, Sequence):
            raise InputError("documents must be a list (one entry per document); wrap a "
                             "single document in a list or use run_one()")
        if not documents:
            raise InputError("no documents given")
        options = _generation_options(generate)
        if options is not None and self.config.is_encoder:
            raise InputError("generation needs a decoder RMT; this model is an encoder")
        started = time.perf_counter()
        with ExitStack() as stack:
            spool = stack.enter_context(TokenSpool())  # one descriptor for all files
            sources = [document_source(doc, self.tokenizer, self.config, stack,
                                       f"document {index}", spool)
                       for index, doc in enumerate(documents)]
            if self.config.is_encoder:
                outputs = self._run_encoder(sources, progress)
            else:
                outputs = self._run_decoder(sources, options, progress)
        return Run(outputs, self.backend, getattr(self.engine, "precision", "fp32"),
                   time.perf_counter() - started, self.choice)

    def run_one(self, document: Document, generate: int | GenerationOptions = 0,
                progress: Progress | None = None) -> EncoderOutput | DecoderOutput:
        """Run a single document."""
        return self.run([document], generate, progress).outputs[0]

    def _tracker(self, sources: Sequence[TokenSource], progress: Progress | None):
        total = max(count_segments(len(s), self.config) for s in sources)
        done = 0

        def advance() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        return advance

    def _stepper(self, rows: int) -> Stepper:
        """A stepper whose rows 0..rows-1 start from the initial state."""
        stepper = Stepper(self.engine)
        for row in range(rows):
            stepper.add(row, self.initial_state)
        return stepper

    def _run_encoder(self, sources, progress) -> list[EncoderOutput]:
        last_logits: list[np.ndarray | None] = [None] * len(sources)
        advance = self._tracker(sources, progress)

        def keep_last(rows, _segments, logits):
            if logits is not None:
                for position, row in enumerate(rows):
                    last_logits[row] = logits[position]
            advance()

        with self._stepper(len(sources)) as stepper:
            run_segments(stepper, sources, keep_last, wants_logits=last_segments)
            state = stepper.states(range(len(sources)))
            self._check_choice(stepper)
        self._check_finite(state, last_logits)
        memory = state[reported(self.config).name_in]
        return [encoder_output(self.config, last_logits[row], memory[row], len(source))
                for row, source in enumerate(sources)]

    def _run_decoder(self, sources, options: GenerationOptions | None,
                     progress) -> list[DecoderOutput]:
        meters = [PerplexityMeter() for _ in sources]
        advance = self._tracker(sources, progress)

        def score(rows, segments, logits):
            for position, row in enumerate(rows):
                if logits is not None:
                    tokens = segments[position]
                    meters[row].add(tokens, logits[position, : len(tokens)])
            advance()

        rows = range(len(sources))
        generated: list[list[int]] = [[] for _ in sources]
        with self._stepper(len(sources)) as stepper:
            if options is None:
                run_segments(stepper, sources, score)
            else:  # every segment but the last writes memory; generation reads the last
                run_segments(stepper, sources, score, skip_last=True, wants_logits=never,
                             before_step=self._unwindowed(stepper))
                lasts = [last_tokens(source, self.config) for source in sources]
                generated = stepper.generate(rows, lasts, options)
                advance()
            state = stepper.states(rows)
            self._check_choice(stepper)
        self._check_finite(state, [np.array(meter.nll) for meter in meters])
        memory = state[reported(self.config).name_in]
        return [decoder_output(
            self.config, None if options is not None else meters[row].perplexity,
            memory[row], len(source), generated[row],
            self.tokenizer.decode(generated[row]) if self.tokenizer and generated[row] else None,
        ) for row, source in enumerate(sources)]

    def _unwindowed(self, stepper: Stepper) -> Callable[[list[int]], None] | None:
        """What makes a sliding-window armt read a generation's context as the authors'
        ``generate`` does, without the window: the rows' window cleared before each step
        (a zero window mask masks it and starts the positions at 0); None for any other
        model. Each step then moves the rows' state through the host once."""
        names = [pair.name_in for pair in window_pairs(self.config)]
        return (lambda rows: stepper.zero(rows, names)) if names else None

    def _check_choice(self, stepper: Stepper) -> None:
        """Compare a cached backend choice's timing with the steps this run took (a wide
        disagreement marks the cache entry: the next run measures again)."""
        choice = self.choice
        if choice is not None and choice.cache is not None and choice.timed is not None:
            self.choice = check_seen(choice, *stepper.seen(logits=choice.timed == "step"))

    @staticmethod
    def _check_finite(state: State, results: Sequence[np.ndarray | None]) -> None:
        """A run whose state or results (logits, log-likelihoods) are not finite has no
        answer: say so."""
        if not all(np.isfinite(array).all() for array in state.values()) or not all(
                np.isfinite(row).all() for row in results if row is not None):
            raise NumericError("the model produced NaN or infinity (in its memory or "
                               "logits); the export or its weights are damaged: re-export "
                               "it, or check the checkpoint with rmt-export")


def _generation_options(generate: int | GenerationOptions) -> GenerationOptions | None:
    """``run``'s generate argument as options (None: no generation)."""
    if isinstance(generate, GenerationOptions):
        return generate
    if isinstance(generate, bool) or not isinstance(generate, int) or generate < 0:
        raise InputError(f"generate must be a token count >= 0 or GenerationOptions, got "
                         f"{generate!r}")
    return GenerationOptions(generate) if generate else None


def _identity(config: RMTConfig, initial_state: State) -> str:
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for pair in state_pairs(config):
        value = initial_state[pair.name_in]
        digest.update(np.ascontiguousarray(value, value.dtype.newbyteorder("<")).tobytes())
    return digest.hexdigest()
