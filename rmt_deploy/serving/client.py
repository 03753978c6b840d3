"""A client that streams a long document to an RMT served by Triton: it tokenizes and
segments exactly as rmt-run does (the runtime's token sources and segmentation), sends
the segments as one Triton sequence, and returns what rmt-run returns. With a progress
file it saves where it is and resumes there, against the same or a restarted server.

Encoders: label, scores, logits (and the final memory: the state pair results report).
Decoders: perplexity (generation needs the prefill and decode graphs, which are not
served).
"""

from __future__ import annotations

import http.client
import secrets
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rmt_deploy.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, reported, state_pairs
from rmt_deploy.manifest import read_manifest
from rmt_deploy.runtime.backends.base import State
from rmt_deploy.runtime.results import (
    DecoderOutput,
    EncoderOutput,
    decoder_output,
    encoder_output,
)
from rmt_deploy.runtime.scoring import MeterState, PerplexityMeter
from rmt_deploy.runtime.tokens import Document, TokenSource, document_source, manifest_tokenizer
from rmt_deploy.segmentation import count_segments, segment_range, step_inputs
from rmt_deploy.serving.errors import SequenceLostError, ServingError, StateFileError
from rmt_deploy.serving.failover import DEFAULT_RETRY, Failover, Retry, RetryPolicy
from rmt_deploy.serving.identity import MODEL_ID_PARAMETER, model_identity
from rmt_deploy.serving.progress import (
    Progress,
    document_digest,
    load_progress,
    save_progress,
)

SEQUENCE_HEADER = "x-rmt-sequence"  # the balancer keeps a sequence on one replica by it
# (lowercase: HTTP header names are case-blind, gRPC metadata keys must be lowercase)
LOST_STATUS = {"502", "503", "504"}  # a balancer's answer when no replica answers
# Triton's and the model's answers to a segment of a sequence the replica does not hold
LOST_SEQUENCE = ("must specify the START flag", "is not open on this server")


@dataclass(frozen=True)
class StreamResult:
    """A document answered by Triton. ``output.memory`` is None where the server keeps
    the state itself (implicit state)."""

    output: EncoderOutput | DecoderOutput
    sequence_id: int
    segments_sent: int  # segments sent in this call (fewer than all after a resume)
    seconds: float
    retries: tuple[Retry, ...] = ()  # segments sent again after a lost replica

    @property
    def segments_per_second(self) -> float:
        return self.segments_sent / self.seconds if self.seconds > 0 else float("inf")


class TritonClient:
    """Streams documents to one RMT model on one Triton server or balancer (HTTP). A
    sequence whose replica is lost is restarted from its last state as ``retry`` allows
    (None: never). Not shared between threads: give each thread its own client."""

    def __init__(self, export: str | Path, url: str = "127.0.0.1:8000", model: str = "rmt",
                 timeout: float = 300.0, retry: RetryPolicy | None = DEFAULT_RETRY) -> None:
        try:
            import tritonclient.http as http
            from tritonclient.utils import InferenceServerException
        except ImportError:
            raise ServingError("tritonclient is not installed: pip install "
                               "'rmt-deploy[serving]'") from None
        self._http, self._server_error = http, InferenceServerException
        manifest = read_manifest(export)
        self.config = manifest.config
        self.model_id = model_identity(manifest)
        self.tokenizer = manifest_tokenizer(manifest)
        self.url, self.model = url, model
        self._client = http.InferenceServerClient(url, connection_timeout=timeout,
                                                  network_timeout=timeout)
        served = self._call(lambda: self._client.get_model_config(model))
        served_id = served.get("parameters", {}).get(MODEL_ID_PARAMETER, {}).get("string_value")
        if served_id != self.model_id:
            raise ServingError(f"model {model!r} at {url} is not the export {export} (model id "
                               f"{served_id} != {self.model_id}); pass the export it was "
                               "written from")
        self.pairs = state_pairs(self.config)
        outputs = {o["name"] for o in served.get("output", [])}
        self.keeps_state = not any(pair.name_out in outputs for pair in self.pairs)
        self.retry = None if self.keeps_state else retry

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, document: Document, progress_file: str | Path | None = None,
            sequence_id: int | None = None, save_every: int = 1) -> StreamResult:
        """Stream one document as one sequence. With ``progress_file``, progress is saved
        every ``save_every`` segments and, if the file exists, the run resumes there."""
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
            failover = Failover(self.step, self.retry) if self.retry else None
            run = _Run(self, source, sequence_id, saved, failover.step if failover else None)
            for index in range(run.first, run.total):
                done = index + 1 - run.first
                last = index == run.total - 1
                saving = progress_file is not None and (done % save_every == 0 or last)
                run.step(index, want_state=saving or last)
                if saving:
                    save_progress(progress_file, run.progress(self.model_id, digest))
        return StreamResult(run.output(), sequence_id, run.total - run.first,
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

    def step(self, sequence_id: int, input_ids: np.ndarray, attention_mask: np.ndarray,
             start: bool, end: bool, state_in: Mapping[str, np.ndarray] | None = None,
             want_state: bool = True) -> tuple[np.ndarray, State | None]:
        """One segment of a sequence: logits [1, ...] and, where asked and the server
        returns it, the new state (every pair [1, ...]); ``state_in`` restores a saved
        sequence on its START request."""
        from tritonclient.utils import np_to_triton_dtype

        http = self._http
        arrays = [(INPUT_IDS, np.ascontiguousarray(input_ids, np.int64)),
                  (ATTENTION_MASK, np.ascontiguousarray(attention_mask, np.int64))]
        if state_in is not None:
            arrays += [(pair.name_in, np.ascontiguousarray(state_in[pair.name_in], pair.dtype))
                       for pair in self.pairs]
        inputs = []
        for name, array in arrays:
            tensor = http.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        returns_state = want_state and not self.keeps_state
        names = [LOGITS] + ([pair.name_out for pair in self.pairs] if returns_state else [])
        outputs = [http.InferRequestedOutput(name) for name in names]
        result = self._call(lambda: self._client.infer(
            self.model, inputs, outputs=outputs, sequence_id=sequence_id,
            sequence_start=start, sequence_end=end,
            headers={SEQUENCE_HEADER: str(sequence_id)}))
        state = {pair.name_in: result.as_numpy(pair.name_out) for pair in self.pairs}
        return result.as_numpy(LOGITS), state if returns_state else None

    def _call(self, request):
        try:
            return request()
        except (OSError, http.client.HTTPException) as error:
            reason = getattr(error, "strerror", None) or error or type(error).__name__
            raise SequenceLostError(f"cannot reach Triton at {self.url} ({reason}); start the "
                                    "server or fix the address") from None
        except self._server_error as error:
            message = (error.message() or "request failed").strip()
            if error.status() in LOST_STATUS:  # the balancer has no replica to give
                raise SequenceLostError(f"the balancer at {self.url} answered HTTP "
                                        f"{error.status()}: no Triton replica behind it "
                                        "answers; start one") from None
            lost = any(sign in message for sign in LOST_SEQUENCE)
            raise (SequenceLostError if lost else ServingError)(
                f"Triton at {self.url}, model {self.model!r}: {message}") from None



def stream_concurrently(export: str | Path, url: str, model: str,
                        documents: Sequence[Document]) -> tuple[list[StreamResult], float]:
    """Stream every document as its own sequence, all at once (a client and a thread
    each); returns the results in order and the wall-clock seconds it took."""

    def stream(document: Document) -> StreamResult:
        with TritonClient(export, url, model) as client:
            return client.run(document)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, len(documents))) as pool:
        results = list(pool.map(stream, documents))
    return results, time.perf_counter() - started

class _Run:
    """One document's segments on the server, and what its answer is built from."""

    def __init__(self, client: TritonClient, source: TokenSource, sequence_id: int,
                 saved: Progress | None, send=None) -> None:
        self.client, self.source, self.sequence_id = client, source, sequence_id
        self.send = send or client.step  # failover's step, or the client's own
        self.config = client.config
        self.total = count_segments(len(source), self.config)
        self.first = saved.next_segment if saved else 0
        self.state = ({name: array[None] for name, array in saved.state.items()} if saved
                      else None)
        self.restore = saved is not None  # the first request carries the saved state
        self.logits = saved.logits if saved else None
        self.next_segment = self.first
        self.meter = PerplexityMeter(
            MeterState.after(saved.logits, saved.nll, saved.count)
            if saved is not None and not self.config.is_encoder else None)

    def step(self, index: int, want_state: bool) -> None:
        tokens = self.source.tokens(*segment_range(len(self.source), index, self.config))
        input_ids, attention_mask = step_inputs([tokens], self.config)
        logits, state = self.send(
            self.sequence_id, input_ids, attention_mask, start=index == self.first,
            end=index == self.total - 1, state_in=self.state if self.restore else None,
            want_state=want_state)
        if want_state:
            self.state = state
        self.restore = False
        if self.config.is_encoder:
            self.logits = logits[0]
        else:
            self.meter.add(tokens, logits[0, : len(tokens)])
            self.logits = logits[0, len(tokens) - 1]
        self.next_segment = index + 1

    def progress(self, model_id: str, digest: str) -> Progress:
        meter = self.meter.state
        return Progress(model_id, digest, len(self.source), self.next_segment,
                        {name: array[0] for name, array in self.state.items()},
                        self.logits, meter.nll, meter.count)

    def output(self) -> EncoderOutput | DecoderOutput:
        memory = None if self.state is None else self.state[reported(self.config).name_in][0]
        if not self.config.is_encoder:
            return decoder_output(self.config, self.meter.perplexity, memory, len(self.source))
        return encoder_output(self.config, self.logits, memory, len(self.source))
