"""The runtime's Python API: open a model once, run texts, files or token ids through
it, get typed results. An opened model is safe to use from several threads: every call
keeps its memory in its own backend buffers."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from rmt_deploy.errors import BackendError, InputError, NumericError
from rmt_deploy.files import sha256_file
from rmt_deploy.manifest import MANIFEST_NAME
from rmt_deploy.runtime.backends.base import StepEngine
from rmt_deploy.runtime.loop import last_segments, run_segments
from rmt_deploy.runtime.results import DecoderOutput, EncoderOutput, Run, encoder_output
from rmt_deploy.runtime.scoring import PerplexityMeter
from rmt_deploy.runtime.session import StreamSession
from rmt_deploy.runtime.stepper import Stepper
from rmt_deploy.runtime.tokens import Document, TokenSource, document_source
from rmt_deploy.segmentation import count_segments, segment_range
from rmt_deploy.spec import RMTConfig

#: ``progress(segments_done, segments_total)``.
Progress = Callable[[int, int], None]


class RMTModel:
    """An RMT ready to run on one backend."""

    def __init__(self, engine: StepEngine, initial_memory: np.ndarray,
                 tokenizer=None, description: str = "") -> None:
        self.engine = engine
        self.config: RMTConfig = engine.config
        self.initial_memory = np.asarray(initial_memory, dtype=np.float32)
        self.tokenizer = tokenizer
        self.description = description
        self._identity: str | None = None
        expected = (self.config.num_mem_tokens, self.config.hidden_size)
        if self.initial_memory.shape != expected:
            raise BackendError(f"initial memory has shape {self.initial_memory.shape}, "
                               f"expected {expected}")

    @property
    def backend(self) -> str:
        return self.engine.name

    @property
    def identity(self) -> str:
        """sha256 naming this model, which saved session states are checked against: of
        ``rmt.json`` for an export (it holds every file's sha256, so one identity covers
        all its graphs and backends), of the file for a checkpoint, else of the config and
        initial memory."""
        if self._identity is None:
            self._identity = _identity(self.description, self.config, self.initial_memory)
        return self._identity

    def session(self, total_tokens: int | None = None) -> StreamSession:
        """A stream session: feed a document in pieces, read its result at any time."""
        return StreamSession(self, total_tokens=total_tokens)

    def restore_session(self, data: bytes) -> StreamSession:
        """A session from ``StreamSession.save()``'s bytes, saved from this model."""
        return StreamSession.restore(self, data)

    def run(self, documents: Sequence[Document], generate: int = 0,
            progress: Progress | None = None) -> Run:
        """Run a batch of documents with the authors' per-row semantics."""
        if isinstance(documents, (str, bytes, bytearray, Path, np.ndarray)) or not isinstance(
                documents, Sequence):
            raise InputError("documents must be a list (one entry per document); wrap a "
                             "single document in a list or use run_one()")
        if not documents:
            raise InputError("no documents given")
        if generate < 0:
            raise InputError(f"generate must be >= 0, got {generate}")
        if generate and self.config.is_encoder:
            raise InputError("generation needs a decoder RMT; this model is an encoder")
        started = time.perf_counter()
        with ExitStack() as stack:
            sources = [document_source(doc, self.tokenizer, self.config, stack,
                                       f"document {index}")
                       for index, doc in enumerate(documents)]
            if self.config.is_encoder:
                outputs = self._run_encoder(sources, progress)
            else:
                outputs = self._run_decoder(sources, generate, progress)
        return Run(outputs, self.backend, getattr(self.engine, "precision", "fp32"),
                   time.perf_counter() - started)

    def run_one(self, document: Document, generate: int = 0,
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
        """A stepper whose rows 0..rows-1 start from the initial memory."""
        stepper = Stepper(self.engine)
        for row in range(rows):
            stepper.add(row, self.initial_memory)
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
            memory = stepper.memories(range(len(sources)))
        self._check_finite(memory, last_logits)
        return [encoder_output(self.config, last_logits[row], memory[row], len(source))
                for row, source in enumerate(sources)]

    def _run_decoder(self, sources, generate, progress) -> list[DecoderOutput]:
        meters = [PerplexityMeter() for _ in sources]
        advance = self._tracker(sources, progress)

        def score(rows, segments, logits):
            for position, row in enumerate(rows):
                tokens = segments[position]
                meters[row].add(tokens, logits[position, : len(tokens)])
            advance()

        with self._stepper(len(sources)) as stepper:
            run_segments(stepper, sources, score, skip_last=bool(generate))
            memory = stepper.memories(range(len(sources)))
            generated = [self._generate(stepper, row, source, meters[row], generate)
                         if generate else [] for row, source in enumerate(sources)]
        self._check_finite(memory, [np.array(meter.nll) for meter in meters])
        outputs = []
        for row, source in enumerate(sources):
            text = (self.tokenizer.decode(generated[row])
                    if self.tokenizer and generated[row] else None)
            outputs.append(DecoderOutput(
                perplexity=meters[row].perplexity, tokens=len(source),
                segments=count_segments(len(source), self.config), memory=memory[row],
                generated_ids=generated[row], generated=text,
            ))
        if generate:
            advance()  # every row's last segment, read while generating
        return outputs

    def _generate(self, stepper: Stepper, row: int, source: TokenSource,
                  meter: PerplexityMeter, max_new_tokens: int) -> list[int]:
        """Read the row's last segment without write slots, then extend it greedily."""
        config = self.config
        last = count_segments(len(source), config) - 1
        tokens = source.tokens(*segment_range(len(source), last, config))
        limit = config.max_positions
        if limit is not None and config.num_mem_tokens + len(tokens) + max_new_tokens - 1 > limit:
            raise InputError(
                f"cannot generate {max_new_tokens} tokens: the last segment would exceed the "
                f"model's {limit} positions; ask for at most "
                f"{limit - config.num_mem_tokens - len(tokens) + 1}"
            )
        context = tokens.astype(np.int64)
        generated: list[int] = []
        for _ in range(max_new_tokens):
            logits = stepper.read(row, context[None], np.ones((1, len(context)), np.int64))
            if not generated:
                meter.add(tokens, logits[0, : len(tokens)])
            next_id = int(logits[0, -1].argmax())
            generated.append(next_id)
            if next_id == config.eos_token_id:
                break
            context = np.append(context, next_id)
        return generated

    @staticmethod
    def _check_finite(memory: np.ndarray, results: Sequence[np.ndarray | None]) -> None:
        """A run whose memory or results (logits, log-likelihoods) are not finite has no
        answer: say so."""
        if not np.isfinite(memory).all() or not all(
                np.isfinite(row).all() for row in results if row is not None):
            raise NumericError("the model produced NaN or infinity (in its memory or "
                               "logits); the export or its weights are damaged: re-export "
                               "it, or check the checkpoint with rmt-export")


def _identity(description: str, config: RMTConfig, initial_memory: np.ndarray) -> str:
    path = Path(description) if description else None
    if path is not None and (path / MANIFEST_NAME).is_file():
        return sha256_file(path / MANIFEST_NAME)
    if path is not None and path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    digest.update(np.ascontiguousarray(initial_memory, dtype="<f4").tobytes())
    return digest.hexdigest()
