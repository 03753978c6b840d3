"""A client that streams a long document to an RMT served by Triton over gRPC: it
tokenizes and segments exactly as rmt-run does (the runtime's token sources and
segmentation), sends the segments as one Triton sequence in chunks of several segments,
pipelined (a bounded number of chunks in flight on one gRPC stream, stepped in order by
the server), and returns what rmt-run returns. With a progress file it saves where it is
and resumes there, against the same or a restarted server. Each request carries the
sequence id as the ``x-rmt-sequence`` header, which a balancer hashes to keep a sequence
on one replica; a sequence whose replica is lost is restarted from the client's last
state on another (serving/failover.py).

Encoders: label, scores, logits (and the final memory: the state pair results report).
Decoders: perplexity; and ``generate``: a question answered from a sequence's state
(the context streamed before it, or a saved state sent with START), as rmt-run
--generate answers it.
"""

from __future__ import annotations

import itertools
import json
import queue
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

from rmt_deploy.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, reported, state_pairs
from rmt_deploy.manifest import read_manifest
from rmt_deploy.runtime.backends.base import State
from rmt_deploy.runtime.generation import GenerationOptions
from rmt_deploy.runtime.results import (
    DecoderOutput,
    EncoderOutput,
    decoder_output,
    encoder_output,
)
from rmt_deploy.runtime.scoring import MeterState, PerplexityMeter
from rmt_deploy.runtime.tokens import Document, TokenSource, document_source, manifest_tokenizer
from rmt_deploy.segmentation import count_segments, segment_range, segments_in, step_inputs
from rmt_deploy.serving.config import CONTEXT_PARAMETER, GENERATE_PARAMETER, GENERATED
from rmt_deploy.serving.errors import SequenceLostError, ServingError, StateFileError
from rmt_deploy.serving.failover import DEFAULT_RETRY, Failover, Retry, RetryPolicy
from rmt_deploy.serving.identity import MODEL_ID_PARAMETER, model_identity
from rmt_deploy.serving.progress import (
    Progress,
    document_digest,
    load_progress,
    save_progress,
)

#: The most logits bytes one decoder chunk's response carries (each position's logits
#: over the vocabulary come back for the perplexity).
DECODER_CHUNK_BYTES = 32 << 20
SEQUENCE_HEADER = "x-rmt-sequence"  # the balancer keeps a sequence on one replica by it
# (lowercase: HTTP header names are case-blind, gRPC metadata keys must be lowercase)
# Triton's and the model's answers to a chunk of a sequence the replica does not hold,
# and a balancer's reset of a stream whose replica died under it (nginx: RST_STREAM)
LOST_SEQUENCE = ("must specify the START flag", "is not open on this server",
                 "Stream removed", "RST_STREAM")


@dataclass(frozen=True)
class Chunk:
    """Consecutive segments of one sequence, laid out as the runtime lays them out."""

    sequence_id: int
    input_ids: np.ndarray  # [segments, positions] int64
    attention_mask: np.ndarray  # [segments, positions] int64
    start: bool
    end: bool
    state_in: Mapping[str, np.ndarray] | None = None  # every pair [1, ...]: START only
    logits: bool = True  # whether the answer carries logits (only those read are computed)
    question_context: bool = False  # read as a question's context, as rmt-run --generate
    # reads it (a sliding-window armt without its window)


@dataclass(frozen=True)
class Answer:
    """The server's answer to a chunk."""

    logits: np.ndarray | None  # decoder: [segments, ...] each segment's; encoder: [1, ...]
    # the last's; None where the chunk asked for none
    state: State | None  # every pair [1, ...] after the chunk (None: the server keeps it)


@dataclass(frozen=True)
class Generation:
    """A question answered by a served decoder."""

    ids: list[int]
    text: str | None  # decoded, where the export has a tokenizer
    state: State | None  # the sequence's state, unchanged by generation


@dataclass(frozen=True)
class StreamResult:
    """A document answered by Triton. ``output.memory`` is None where the server keeps
    the state itself (implicit state)."""

    output: EncoderOutput | DecoderOutput
    sequence_id: int
    segments_sent: int  # segments sent in this call (fewer than all after a resume)
    seconds: float
    retries: tuple[Retry, ...] = ()  # chunks sent again after a lost replica

    @property
    def segments_per_second(self) -> float:
        return self.segments_sent / self.seconds if self.seconds > 0 else float("inf")


class TritonClient:
    """Streams documents to one RMT model on one Triton server or balancer (gRPC). A
    sequence whose replica is lost is restarted from its last state as ``retry`` allows
    (None: never). Not shared between threads: give each thread its own client.

    Request: ``input_ids`` / ``attention_mask`` [1, segments, positions] (int64), the
    sequence controls (``sequence_id``, START, END), optionally every state pair's input
    (``memory_in``, [1, ...]) on START to restore a saved sequence, and for a question
    the request parameter ``generate`` (JSON of GenerationOptions). Response: ``logits``
    (decoders: every segment's, [1, segments, positions, vocab]; encoders: the last
    segment's, [1, 1, labels]), every state pair's output (``memory_out``) after the chunk, and
    ``generated`` [1, n] for a question. Models with Triton-held state (onnxruntime /
    tensorrt backends) take one segment a request ([1, positions]) and return no state.
    """

    def __init__(self, export: str | Path, url: str = "127.0.0.1:8001", model: str = "rmt",
                 timeout: float = 300.0, chunk_tokens: int = 1024, in_flight: int = 2,
                 retry: RetryPolicy | None = DEFAULT_RETRY) -> None:
        try:
            import tritonclient.grpc as grpc
            from tritonclient.utils import InferenceServerException
        except ImportError:
            raise ServingError("tritonclient is not installed: pip install "
                               "'rmt-deploy[serving]'") from None
        if chunk_tokens < 1 or in_flight < 1:
            raise ServingError(f"chunk_tokens ({chunk_tokens}) and in_flight ({in_flight}) "
                               "must be >= 1")
        self._grpc, self._server_error = grpc, InferenceServerException
        manifest = read_manifest(export)
        self.config = manifest.config
        self.model_id = model_identity(manifest)
        self.tokenizer = manifest_tokenizer(manifest)
        self.url, self.model, self.timeout = url, model, timeout
        self.in_flight = in_flight
        self._client = grpc.InferenceServerClient(url)
        served = self._call(self._client.get_model_config, model, as_json=True,
                            client_timeout=timeout)["config"]
        served_id = served.get("parameters", {}).get(MODEL_ID_PARAMETER, {}).get("string_value")
        if served_id != self.model_id:
            raise ServingError(f"model {model!r} at {url} is not the export {export} (model id "
                               f"{served_id} != {self.model_id}); pass the export it was "
                               "written from")
        self.pairs = state_pairs(self.config)
        outputs = {o["name"] for o in served.get("output", [])}
        self.keeps_state = not any(pair.name_out in outputs for pair in self.pairs)
        self.decoupled = bool(served.get("model_transaction_policy", {}).get("decoupled"))
        ids = next(i for i in served.get("input", []) if i["name"] == INPUT_IDS)
        self.chunked = len(ids.get("dims", [])) == 2  # [segments, positions]
        segment_bytes = 4 * self.config.segment_size * self.config.vocab_size
        limit = chunk_tokens if self.config.is_encoder else min(
            chunk_tokens, DECODER_CHUNK_BYTES // segment_bytes * self.config.segment_size)
        self.chunk_segments = segments_in(limit, self.config) if self.chunked else 1
        self.retry = None if self.keeps_state else retry

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, document: Document, progress_file: str | Path | None = None,
            sequence_id: int | None = None, save_every: int = 1, end: bool = True,
            generate: GenerationOptions | None = None,
            question_context: bool = False) -> StreamResult:
        """Stream one document as one sequence. With ``progress_file``, progress is saved
        after the chunk that completes every ``save_every`` segments, and, if the file
        exists, the run resumes there. ``end=False`` leaves the sequence open on the
        server (a context that :meth:`generate` answers questions from; with
        ``question_context`` read as ``rmt-run --generate`` reads a context, which only
        a sliding-window armt reads differently: without its window). ``generate``
        (decoders): generate after the document as ``rmt-run --generate`` does, its last
        segment the question, the others the context."""
        if generate is not None and (progress_file is not None or not end):
            raise ServingError("generation ends the sequence and saves no progress; run "
                               "without a progress file to generate")
        if progress_file is not None and self.keeps_state:
            raise ServingError(f"model {self.model!r} keeps the state inside Triton (implicit "
                               "state), so progress cannot be saved; serve it with "
                               "rmt-triton --backend python to resume runs")
        started = time.perf_counter()
        sequence_id = sequence_id or secrets.randbits(63) or 1
        with ExitStack() as stack:
            source = document_source(document, self.tokenizer, self.config, stack)
            digest = document_digest(source, self.config) if progress_file else ""
            saved = self._resume(progress_file, digest, len(source))
            run = _Run(self, source, sequence_id, saved, end and generate is None,
                       context_only=generate is not None,
                       question_context=question_context or generate is not None)
            failover = Failover(self.send, self.retry, generate=self.generate,
                                sequence_id=sequence_id) if self.retry else None
            send = failover.stream if failover else self.send
            ask = failover.question if failover else partial(self.generate, sequence_id)
            saved_at = run.first
            for _ in run.answer(send(run.chunks(self.chunk_segments))):
                last = run.next_segment == run.total
                if progress_file is not None and (
                        last or run.next_segment - saved_at >= save_every):
                    save_progress(progress_file, run.progress(self.model_id, digest))
                    saved_at = run.next_segment
            output = run.output() if generate is None else run.generated(ask(
                run.question(), generate, start=run.total == 1, end=True))
        return StreamResult(output, sequence_id, run.total - run.first,
                            time.perf_counter() - started,
                            tuple(failover.retries) if failover else ())

    def _resume(self, progress_file, digest: str, tokens: int) -> Progress | None:
        if progress_file is None or not Path(progress_file).exists():
            return None
        saved = load_progress(progress_file, self.config)
        if saved.model_id != self.model_id:
            raise StateFileError(f"{progress_file}: saved from another model (model id "
                                 f"{saved.model_id}, this one is {self.model_id}); delete it "
                                 "to start over")
        if saved.document_sha256 != digest or saved.tokens != tokens:
            raise StateFileError(f"{progress_file}: saved for another document; pass the "
                                 "same input or delete the file to start over")
        return saved

    def send(self, chunks: Iterable[Chunk]) -> Iterator[Answer]:
        """Send ``chunks`` in order on one gRPC stream, at most ``in_flight`` unanswered
        (the server steps a sequence's chunks in the order they come); yields their
        answers in the same order. The first failed chunk raises ServingError."""
        chunks = iter(chunks)
        first = next(chunks, None)
        if first is None:
            return
        answers: queue.Queue = queue.Queue()
        self._call(self._client.start_stream, headers=self._header(first.sequence_id),
                   callback=lambda result, error: answers.put((result, error)))
        try:
            pending: dict[str, Chunk] = {}
            done: dict[str, object] = {}  # request id -> its InferResult, if come early
            order: list[str] = []
            for number, chunk in enumerate(itertools.chain([first], chunks)):
                while len(order) >= self.in_flight:
                    yield self._next_answer(answers, pending, done, order)
                request = str(number)
                pending[request] = chunk
                order.append(request)
                inputs, outputs = self._tensors(chunk)
                try:
                    self._client.async_stream_infer(
                        self.model, inputs, outputs=outputs, request_id=request,
                        sequence_id=chunk.sequence_id, sequence_start=chunk.start,
                        sequence_end=chunk.end, parameters={CONTEXT_PARAMETER: True}
                        if chunk.question_context else None)
                except self._server_error as error:
                    raise self._broken(answers, error) from None
            while order:
                yield self._next_answer(answers, pending, done, order)
        finally:
            self._client.stop_stream(cancel_requests=True)

    def _next_answer(self, answers: queue.Queue, pending: dict, done: dict,
                     order: list[str]) -> Answer:
        request = order.pop(0)
        while request not in done:
            result = self._receive(answers)
            done[result.get_response().id] = result
        return self._answer(pending.pop(request), done.pop(request))

    def _receive(self, answers: queue.Queue):
        """The stream's next result; a server error or a silence of ``timeout`` raises."""
        try:
            result, error = answers.get(timeout=self.timeout)
        except queue.Empty:
            raise ServingError(f"Triton at {self.url} did not answer within "
                               f"{self.timeout:g} s; check the server") from None
        if error is not None:
            raise self._failure(error)
        return result

    def step(self, chunk: Chunk) -> Answer:
        """One chunk, sent alone and answered."""
        return next(iter(self.send([chunk])))

    def generate(self, sequence_id: int, question: Sequence[int] | np.ndarray,
                 options: GenerationOptions, start: bool = False, end: bool = False,
                 state_in: Mapping[str, np.ndarray] | None = None,
                 on_token: Callable[[int], None] | None = None) -> Generation:
        """Decoders: the answer to ``question`` (content token ids, one segment) from the
        sequence's state: the context streamed before it (chunks without END), or with
        ``start`` a new sequence from ``state_in`` (a state an earlier run returned; one
        context read once answers many questions). ``end`` closes the sequence. From a
        decoupled model (rmt-triton --decoupled), ``on_token`` sees each token as it is
        made."""
        grpc = self._grpc
        if self.config.is_encoder:
            raise ServingError(f"model {self.model!r} is an encoder: it answers with a label "
                               "(run), and generation needs a decoder")
        question = np.asarray(question, np.int64)
        if not 1 <= len(question) <= self.config.segment_size:
            raise ServingError(f"a question is 1 to {self.config.segment_size} tokens (one "
                               f"segment), got {len(question)}; send the rest as context")
        ids, mask = step_inputs([question], self.config)
        chunk = Chunk(sequence_id, ids, mask, start, end, state_in)
        inputs, _ = self._tensors(chunk)
        outputs = [grpc.InferRequestedOutput(GENERATED)] + [
            grpc.InferRequestedOutput(pair.name_out) for pair in self.pairs
            if not self.keeps_state]
        parameters = {GENERATE_PARAMETER: json.dumps(asdict(options))}
        if self.decoupled:
            result = self._streamed(chunk, inputs, outputs, parameters, on_token)
        else:
            result = self._call(
                self._client.infer, self.model, inputs, outputs=outputs,
                sequence_id=sequence_id, sequence_start=start, sequence_end=end,
                client_timeout=self.timeout, parameters=parameters,
                headers=self._header(sequence_id))
        generated = result.as_numpy(GENERATED)[0].tolist()
        text = self.tokenizer.decode(generated) if self.tokenizer and generated else None
        state = None if self.keeps_state else {
            pair.name_in: result.as_numpy(pair.name_out) for pair in self.pairs}
        return Generation(generated, text, state)

    def _streamed(self, chunk: Chunk, inputs: list, outputs: list, parameters: dict,
                  on_token: Callable[[int], None] | None):
        """A question to a decoupled model: each token's response goes to ``on_token``;
        returns the final response (every id, the state)."""
        answers: queue.Queue = queue.Queue()
        self._call(self._client.start_stream, headers=self._header(chunk.sequence_id),
                   callback=lambda result, error: answers.put((result, error)))
        try:
            try:
                self._client.async_stream_infer(
                    self.model, inputs, outputs=outputs, sequence_id=chunk.sequence_id,
                    sequence_start=chunk.start, sequence_end=chunk.end,
                    parameters=parameters, enable_empty_final_response=True)
            except self._server_error as error:
                raise self._broken(answers, error) from None
            while True:
                result = self._receive(answers)
                if result.get_response().parameters["triton_final_response"].bool_param:
                    return result
                if on_token is not None:
                    on_token(int(result.as_numpy(GENERATED)[0, 0]))
        finally:
            self._client.stop_stream(cancel_requests=True)

    @staticmethod
    def _header(sequence_id: int) -> dict[str, str]:
        """The metadata a balancer hashes to keep a sequence on one replica."""
        return {SEQUENCE_HEADER: str(sequence_id)}

    def _tensors(self, chunk: Chunk) -> tuple[list, list]:
        from tritonclient.utils import np_to_triton_dtype

        grpc = self._grpc
        ids, mask = chunk.input_ids, chunk.attention_mask
        if not self.chunked:
            if len(ids) != 1:
                raise ServingError(f"model {self.model!r} takes one segment a request")
            ids, mask = ids[0], mask[0]
        arrays = [(INPUT_IDS, np.ascontiguousarray(ids[None], np.int64)),
                  (ATTENTION_MASK, np.ascontiguousarray(mask[None], np.int64))]
        if chunk.state_in is not None:
            arrays += [(pair.name_in, np.ascontiguousarray(chunk.state_in[pair.name_in],
                                                            pair.dtype)) for pair in self.pairs]
        inputs = []
        for name, array in arrays:
            tensor = grpc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        names = [LOGITS] * chunk.logits + (
            [] if self.keeps_state else [p.name_out for p in self.pairs])
        return inputs, [grpc.InferRequestedOutput(name) for name in names]

    def _answer(self, chunk: Chunk, result) -> Answer:
        logits = result.as_numpy(LOGITS)
        logits = logits[0] if self.chunked and logits is not None else logits
        state = None if self.keeps_state else {
            pair.name_in: result.as_numpy(pair.name_out) for pair in self.pairs}
        return Answer(logits, state)

    def _call(self, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except self._server_error as error:
            raise self._failure(error) from None

    def _broken(self, answers: queue.Queue, error) -> ServingError:
        """A request refused on a broken stream: the failure its callback was told of
        (a lost server, say), else the refusal itself."""
        while True:
            try:
                _, reason = answers.get(timeout=1.0)
            except queue.Empty:
                return self._failure(error)
            if reason is not None:
                return self._failure(reason)

    def _failure(self, error) -> ServingError:
        """A one-line ServingError for tritonclient's exception: a SequenceLostError where
        the server holding the sequence is gone (unreachable, a balancer with no replica
        behind it answers UNAVAILABLE, or it resets the stream the replica died under) or
        no longer holds it."""
        message = ((error.message() or "request failed").strip().splitlines() or [""])[0]
        if "UNAVAILABLE" in str(error.status()) or "failed to connect" in message:
            return SequenceLostError(f"cannot reach Triton at {self.url} ({message}); start "
                                     "the server or fix the address (gRPC port)")
        lost = any(sign in message for sign in LOST_SEQUENCE)
        return (SequenceLostError if lost else ServingError)(
            f"Triton at {self.url}, model {self.model!r}: {message}")


def stream_concurrently(export: str | Path, url: str, model: str,
                        documents: Sequence[Document], **options) -> tuple[list[StreamResult],
                                                                         float]:
    """Stream every document as its own sequence, all at once (a client and a thread
    each; ``options`` go to each TritonClient); returns the results in order and the
    wall-clock seconds the streaming took (the clients are opened before)."""
    with ExitStack() as stack, ThreadPoolExecutor(max_workers=max(1, len(documents))) as pool:
        clients = list(pool.map(lambda _: stack.enter_context(
            TritonClient(export, url, model, **options)), documents))
        started = time.perf_counter()
        results = list(pool.map(lambda client, document: client.run(document), clients,
                                documents))
        return results, time.perf_counter() - started


class _Run:
    """One document's segments on the server, and what its answer is built from."""

    def __init__(self, client: TritonClient, source: TokenSource, sequence_id: int,
                 saved: Progress | None, end: bool = True, context_only: bool = False,
                 question_context: bool = False) -> None:
        """``context_only``: stream every segment but the last (the question);
        ``question_context``: mark the chunks as a question's context."""
        self.source, self.sequence_id, self.end = source, sequence_id, end
        self.context_only, self.question_context = context_only, question_context
        self.config = client.config
        self.total = count_segments(len(source), self.config)
        self.streamed = self.total - 1 if context_only else self.total
        self.first = saved.next_segment if saved else 0
        self.state = ({name: array[None] for name, array in saved.state.items()} if saved
                      else None)
        self.logits = saved.logits if saved else None
        self.next_segment = self.first
        self.meter = PerplexityMeter(
            MeterState.after(saved.logits, saved.nll, saved.count)
            if saved is not None and not self.config.is_encoder else None)
        self._sent: list[list[np.ndarray]] = []  # each chunk's segments, not yet answered

    def _segment(self, index: int) -> np.ndarray:
        return self.source.tokens(*segment_range(len(self.source), index, self.config))

    def chunks(self, size: int) -> Iterator[Chunk]:
        """The remaining segments as chunks of at most ``size`` segments of one length
        (a decoder's short last segment goes alone; an encoder's short first one is laid
        out as wide as the others); the first is START (carrying the saved state where
        resuming), the last END unless the run leaves the sequence open."""
        index = self.first
        while index < self.streamed:
            segments = [self._segment(index)]
            while len(segments) < size and index + len(segments) < self.streamed:
                following = self._segment(index + len(segments))
                if not self.config.is_encoder and len(following) != len(segments[0]):
                    break
                segments.append(following)
            input_ids, attention_mask = step_inputs(segments, self.config)
            self._sent.append(segments)
            start = index == self.first
            index += len(segments)
            last = index == self.streamed
            yield Chunk(self.sequence_id, input_ids, attention_mask, start, self.end and last,
                        self.state if start else None, self._reads_logits(last),
                        self.question_context)

    def _reads_logits(self, last: bool) -> bool:
        """Whether a chunk's logits are read: an encoder's of the last chunk only, a
        decoder's of every chunk (perplexity) unless the run only reads a context."""
        return last if self.config.is_encoder else not self.context_only

    def answer(self, answers: Iterable[Answer]) -> Iterator[Answer]:
        """Read each chunk's answer in order (its logits into the result, its state
        kept) and pass it on."""
        for answer in answers:
            segments = self._sent.pop(0)
            if answer.state is not None:
                self.state = answer.state
            if answer.logits is not None and self.config.is_encoder:
                self.logits = answer.logits[-1]
            elif answer.logits is not None:
                for tokens, logits in zip(segments, answer.logits, strict=True):
                    self.meter.add(tokens, logits[: len(tokens)])
                self.logits = answer.logits[-1, len(segments[-1]) - 1]
            self.next_segment += len(segments)
            yield answer

    def progress(self, model_id: str, digest: str) -> Progress:
        meter = self.meter.state
        return Progress(model_id, digest, len(self.source), self.next_segment,
                        {name: array[0] for name, array in self.state.items()},
                        self.logits, meter.nll, meter.count)

    def question(self) -> np.ndarray:
        return self._segment(self.total - 1)

    def generated(self, answer: Generation) -> DecoderOutput:
        """rmt-run --generate's output: no perplexity, the generated ids and text."""
        memory = None if answer.state is None else answer.state[
            reported(self.config).name_in][0]
        return decoder_output(self.config, None, memory, len(self.source), answer.ids,
                              answer.text)

    def output(self) -> EncoderOutput | DecoderOutput:
        memory = None if self.state is None else self.state[reported(self.config).name_in][0]
        if not self.config.is_encoder:
            return decoder_output(self.config, self.meter.perplexity, memory, len(self.source))
        return encoder_output(self.config, self.logits, memory, len(self.source))
