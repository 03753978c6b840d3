"""A real Triton server (the tritonserver binary of .venv-triton, python backend) on
127.0.0.1, checked against the local runtime on the same exports: one sequence in
chunks of several segments, pipelined over gRPC, 16 concurrent interleaved sequences, a
sequence restarted with START, bad requests, a server restart with a client that
resumes from its saved progress, and a decoder answering questions as rmt-run
--generate does, from a context read once; an ARMT (a state of many pairs) and the
published plain Llama RMT likewise.

Skipped when .venv-triton is absent (bash scripts/setup_triton.sh), unless
RMT_REQUIRE_TRITON=1 (CI), where that is a failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.http")

from rmt_deploy.runtime import open_model  # noqa: E402
from rmt_deploy.runtime.generation import GenerationOptions  # noqa: E402
from rmt_deploy.runtime.stepper import Stepper  # noqa: E402
from rmt_deploy.segmentation import (  # noqa: E402
    content_id_range,
    segment_bounds,
    segment_range,
    step_inputs,
)
from rmt_deploy.serving.client import Chunk, TritonClient, stream_concurrently  # noqa: E402
from rmt_deploy.serving.config import ServingOptions  # noqa: E402
from rmt_deploy.serving.errors import ServingError, StateFileError  # noqa: E402
from rmt_deploy.serving.progress import load_progress, save_progress  # noqa: E402
from rmt_deploy.serving.repository import write_repository  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("RMT_TRITON_VENV", ROOT / ".venv-triton"))


def _require_venv() -> None:
    if (VENV / "bin" / "python").is_file():
        return
    message = f"no Triton environment at {VENV}: run bash scripts/setup_triton.sh"
    if os.environ.get("RMT_REQUIRE_TRITON") == "1":
        pytest.fail(message)
    pytest.skip(message)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Server:
    """tritonserver started by scripts/triton_serve.sh, ready when constructed."""

    def __init__(self, repo: Path, log: Path) -> None:
        http, grpc, metrics = free_ports(3)
        self.http, self.url = f"127.0.0.1:{http}", f"127.0.0.1:{grpc}"  # url: gRPC
        self.log = log
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                ["bash", str(ROOT / "scripts" / "triton_serve.sh"), str(repo),
                 "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port",
                 str(metrics), "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1",
                 "--exit-timeout-secs", "1"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(repo)

    def _wait_ready(self, repo: Path) -> None:
        import tritonclient.http as http

        client = http.InferenceServerClient(self.http)
        models = [p.name for p in repo.iterdir()]
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if all(client.is_model_ready(name) for name in models):
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"tritonserver did not get ready: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="module")
def repo(encoder_export, decoder_export, armt_export, window_export, llama_rmt_export,
         tmp_path_factory) -> Path:
    _require_venv()
    repo = tmp_path_factory.mktemp("triton") / "repo"
    write_repository(repo, encoder_export, ServingOptions(name="enc", max_batch_size=16))
    write_repository(repo, decoder_export, ServingOptions(name="dec", max_batch_size=4))
    write_repository(repo, decoder_export, ServingOptions(name="dec_stream", max_batch_size=4,
                                                          decoupled=True))
    write_repository(repo, armt_export, ServingOptions(name="armt", max_batch_size=4))
    write_repository(repo, window_export[0], ServingOptions(name="window", max_batch_size=4))
    write_repository(repo, llama_rmt_export, ServingOptions(name="llama", max_batch_size=4))
    return repo


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    running = Server(repo, tmp_path_factory.mktemp("logs") / "triton.log")
    yield running
    running.stop()


def documents(config, lengths, seed: int) -> list[list[int]]:
    low, high = content_id_range(config)
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, size=int(n)).tolist() for n in lengths]


def stop_after(client: TritonClient, answers: int, stop) -> None:
    """Make ``client`` call ``stop()`` once ``answers`` chunks are answered (chunks sent
    after them may still be in flight)."""
    send = client.send

    def stopping(chunks):
        for count, answer in enumerate(send(chunks)):
            if count == answers:
                stop()
            yield answer

    client.send = stopping


def interrupt() -> None:
    raise KeyboardInterrupt  # the client is stopped mid-document


def local_state(model, document) -> dict[str, np.ndarray]:
    """Every state pair of ``model`` (one row) after every segment of ``document``, as
    rmt-run's stepper leaves it."""
    ids = np.asarray(document)
    with Stepper(model.engine) as stepper:
        stepper.add(0, model.initial_state)
        for start, end in segment_bounds(len(ids), model.config):
            stepper.step([0], [ids[start:end]], logits=False)
        return stepper.state(0)


def assert_same(served, local) -> None:
    assert (served.tokens, served.segments) == (local.tokens, local.segments)
    if hasattr(local, "label"):
        assert served.label == local.label
        np.testing.assert_allclose(served.logits, local.logits, atol=1e-5)
    else:
        assert served.perplexity == pytest.approx(local.perplexity, rel=1e-5)
    np.testing.assert_allclose(served.memory, local.memory, atol=1e-5)


def test_one_sequence_equals_rmt_run(server, encoder_export, tmp_path):
    text = " ".join(f"w{i % 40 + 3}" for i in range(333))
    path = tmp_path / "doc.txt"
    path.write_text(text)
    local = open_model(encoder_export).run_one(path)
    size = open_model(encoder_export).config.segment_size
    with TritonClient(encoder_export, server.url, "enc", chunk_tokens=5 * size) as client:
        assert client.chunk_segments == 5
        result = client.run(path)
        assert_same(result.output, local)
        assert result.segments_sent == local.segments > 20
        assert_same(client.run(text).output, local)
    with TritonClient(encoder_export, server.url, "enc", chunk_tokens=1, in_flight=1) as client:
        assert_same(client.run(path).output, local)  # one segment a request, none ahead


def test_decoder_perplexity_equals_rmt_run_and_resumes(server, decoder_export, tmp_path):
    (doc,) = documents(open_model(decoder_export).config, [47], seed=1)
    local = open_model(decoder_export).run_one(doc)
    progress = tmp_path / "progress.npz"
    size = open_model(decoder_export).config.segment_size
    with TritonClient(decoder_export, server.url, "dec", chunk_tokens=2 * size) as client:
        assert_same(client.run(doc).output, local)
        stop_after(client, 2, interrupt)
        with pytest.raises(KeyboardInterrupt):
            client.run(doc, progress_file=progress)
    with TritonClient(decoder_export, server.url, "dec", chunk_tokens=2 * size) as client:
        resumed = client.run(doc, progress_file=progress)
    assert resumed.segments_sent == local.segments - 4
    assert_same(resumed.output, local)


def test_16_concurrent_sequences_do_not_bleed(server, encoder_export):
    model = open_model(encoder_export)
    docs = documents(model.config, np.linspace(5, 400, 16), seed=2)
    local = model.run(docs).outputs
    served, seconds = stream_concurrently(encoder_export, server.url, "enc", docs)
    for result, expected in zip(served, local, strict=True):
        assert_same(result.output, expected)
    assert len({result.sequence_id for result in served}) == 16
    total = sum(result.segments_sent for result in served)
    with TritonClient(encoder_export, server.url, "enc") as client:
        single = client.run(docs[-1])
    print(f"\n16 concurrent sequences: {total} segments in {seconds:.2f} s = "
          f"{total / seconds:.0f} segments/s; one sequence: {single.segments_per_second:.0f}/s")


def test_start_restarts_a_sequence(server, encoder_export):
    model = open_model(encoder_export)
    first, second = documents(model.config, [60, 45], seed=3)
    with TritonClient(encoder_export, server.url, "enc") as client:
        for index in range(3):  # half a sequence, never ended
            ids, mask = step_inputs([np.asarray(first[index * 10:(index + 1) * 10])],
                                    model.config)
            client.step(Chunk(77, ids, mask, start=index == 0, end=False))
        result = client.run(second, sequence_id=77)  # START again on the same id
    assert_same(result.output, model.run_one(second))


def test_bad_requests_fail_clearly_and_disturb_nothing(server, encoder_export, tmp_path):
    model = open_model(encoder_export)
    config = model.config
    (doc,) = documents(config, [55], seed=4)
    segments = [step_inputs([np.asarray(doc[slice(*segment_range(len(doc), i, config))])],
                            config) for i in range(6)]
    with TritonClient(encoder_export, server.url, "enc") as client:
        for index in range(3):  # sequence 501 is open when the bad requests come
            client.step(Chunk(501, *segments[index], start=index == 0, end=False))
        ids, mask = segments[0]
        with pytest.raises(ServingError, match="must specify the START flag"):
            client.step(Chunk(502, ids, mask, start=False, end=False))
        wrong = np.zeros((1, config.num_mem_tokens + 1, config.hidden_size), np.float32)
        with pytest.raises(ServingError, match="memory_in"):
            client.step(Chunk(503, ids, mask, True, False, {"memory_in": wrong}))
        with pytest.raises(ServingError, match="token ids must lie in"):
            client.step(Chunk(504, ids + config.vocab_size, mask, start=True, end=True))
        # Progress from another model, or truncated: refused before anything is sent.
        progress = tmp_path / "progress.npz"
        partial = client.run(doc, progress_file=progress)
        saved = load_progress(progress, config)
        save_progress(progress, type(saved)(**{**saved.__dict__, "model_id": "0" * 32}))
        with pytest.raises(StateFileError, match="saved from another model"):
            client.run(doc, progress_file=progress)
        progress.write_bytes(progress.read_bytes()[:300])
        with pytest.raises(StateFileError, match="damaged or truncated"):
            client.run(doc, progress_file=progress)
        with pytest.raises(StateFileError, match="another document"):
            other = tmp_path / "other.npz"
            client.run(doc[:-1], progress_file=other)  # writes it
            client.run(doc, progress_file=other)
        for index in range(3, 6):  # sequence 501 goes on as if nothing happened
            answer = client.step(Chunk(501, *segments[index], start=False, end=index == 5))
    local = model.run_one(doc)
    np.testing.assert_allclose(answer.logits[-1], local.logits, atol=1e-5)
    np.testing.assert_allclose(answer.state["memory_in"][0], local.memory, atol=1e-5)
    assert_same(partial.output, local)


def test_server_restart_resumes_from_saved_progress(repo, encoder_export, tmp_path):
    model = open_model(encoder_export)
    (doc,) = documents(model.config, [300], seed=5)
    progress = tmp_path / "progress.npz"
    server = Server(repo, tmp_path / "triton.log")
    try:
        size = model.config.segment_size
        with TritonClient(encoder_export, server.url, "enc", chunk_tokens=3 * size,
                          retry=None) as client:
            stop_after(client, 4, server.stop)  # the server goes away mid-document
            with pytest.raises(ServingError, match=f"Triton at {server.url}"):
                client.run(doc, progress_file=progress)
        saved = load_progress(progress, model.config).next_segment  # the chunk in flight
        assert saved in (15, 18)  # when the server stopped may have been answered
    finally:
        server.stop()
    restarted = Server(repo, tmp_path / "triton2.log")
    try:
        with TritonClient(encoder_export, restarted.url, "enc") as client:
            result = client.run(doc, progress_file=progress)
    finally:
        restarted.stop()
    local = model.run_one(doc)
    assert result.segments_sent == local.segments - saved
    assert_same(result.output, local)


def test_decoder_answers_as_rmt_run_generate_from_a_context_read_once(server, decoder_export):
    """The context streamed as an open sequence answers two questions, each as rmt-run
    --generate answers context + question; its state, sent with START on a new sequence,
    answers again without re-reading the context."""
    model = open_model(decoder_export)
    config = model.config
    context, first, second = documents(config, [3 * config.segment_size, 4, 3], seed=6)
    options = GenerationOptions(max_new_tokens=6)
    expected = [model.run_one(context + question, generate=options).generated_ids
                for question in (first, second)]
    with TritonClient(decoder_export, server.url, "dec") as client:
        client.run(context, sequence_id=901, end=False)
        answers = [client.generate(901, question, options) for question in (first, second)]
        assert [answer.ids for answer in answers] == expected
        assert answers[0].text == model.tokenizer.decode(expected[0])
        again = client.generate(902, second, options, start=True, end=True,
                                state_in=answers[0].state)
        assert again.ids == expected[1]
        with pytest.raises(ServingError, match="cannot generate 100 tokens"):
            client.generate(901, first, GenerationOptions(max_new_tokens=100))
        with pytest.raises(ServingError, match="a question is 1 to"):
            client.generate(901, context, options)
        for bad, says in (("not json", "must be a JSON object"),
                          ('{"max_new_tokens": 0}', "max_new_tokens must be a positive int"),
                          ('{"beams": 2}', "unknown option beams"),
                          ('{"max_new_tokens": 2, "temperature": "hot"}', "real number")):
            with pytest.raises(ServingError, match=f"parameter generate: .*{says}"):
                raw_request(client, 901, first, {"generate": bad})
        assert client.generate(901, first, options, end=True).ids == expected[0]  # unchanged
        with pytest.raises(ServingError, match="must specify the START flag"):  # ended
            client.generate(901, first, options)


def raw_request(client: TritonClient, sequence_id: int, segment, parameters: dict):
    """One segment sent with the request parameters as given."""
    import tritonclient.grpc as grpc

    ids, mask = step_inputs([np.asarray(segment)], client.config)
    inputs = []
    for name, array in (("input_ids", ids[None]), ("attention_mask", mask[None])):
        tensor = grpc.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    client._call(client._client.infer, client.model, inputs, sequence_id=sequence_id,
                 parameters=parameters)


def test_a_sliding_window_armt_answers_as_rmt_run_generate(server, window_export):
    """A sliding-window ARMT reads a question's context without its window, as rmt-run
    --generate does: a document with generate=, and a context left open with
    question_context=True then asked, give rmt-run --generate's ids; a context read as a
    stream (with the window) leaves another state. A bad question_context is one line."""
    folder, _ = window_export
    model = open_model(folder, backend="onnxruntime", threads=1)
    config = model.config
    context, question = documents(config, [3 * config.segment_size, 4], seed=12)
    options = GenerationOptions(max_new_tokens=6)
    expected = model.run_one(context + question, generate=options)
    with TritonClient(folder, server.url, "window",
                      chunk_tokens=2 * config.segment_size) as client:
        whole = client.run(context + question, generate=options).output
        assert whole.generated_ids == expected.generated_ids and expected.generated_ids
        np.testing.assert_array_equal(whole.memory, expected.memory)
        client.run(context, sequence_id=41, end=False, question_context=True)
        assert client.generate(41, question, options, end=True).ids == expected.generated_ids
        streamed = client.run(context, sequence_id=42, end=False)
        assert np.abs(streamed.output.memory - expected.memory).max() > 1e-3
        with pytest.raises(ServingError, match="model 'window': sequence 42: request "
                           "parameter question_context must be true or false, got 'yes'$"):
            raw_request(client, 42, question, {"question_context": "yes"})


def test_rmt_triton_run_generate_prints_rmt_run_generate_ids(server, decoder_export, tmp_path):
    """rmt-triton-run --generate: the context streamed in chunks, the last segment the
    question; the ids equal rmt-run --generate's (greedy), the JSON fields the same."""
    from click.testing import CliRunner

    from rmt_deploy.cli import run_main
    from rmt_deploy.serving.cli import stream_main

    config = open_model(decoder_export).config
    (doc,) = documents(config, [4 * config.segment_size + 3], seed=7)
    path = tmp_path / "doc.txt"
    path.write_text(open_model(decoder_export).tokenizer.decode(doc))
    local = CliRunner().invoke(run_main, [str(decoder_export), str(path), "--generate", "7",
                                          "--json"])
    served = CliRunner().invoke(stream_main, [str(path), "--model", str(decoder_export),
                                              "--url", server.url, "--name", "dec",
                                              "--chunk-tokens", str(2 * config.segment_size),
                                              "--generate", "7", "--json"])
    assert local.exit_code == 0 and served.exit_code == 0, local.output + served.output
    expected, got = (json.loads(r.output.strip().splitlines()[-1]) for r in (local, served))
    assert got["generated_ids"] == expected["generated_ids"] and expected["generated_ids"]
    assert (got["generated"], got["tokens"], got["segments"]) == (
        expected["generated"], expected["tokens"], expected["segments"])


def test_a_decoupled_decoder_sends_tokens_as_they_are_made(server, decoder_export):
    """rmt-triton --decoupled: each token comes as it is made, then the whole answer;
    chunks are answered as by the model that is not decoupled."""
    model = open_model(decoder_export)
    config = model.config
    context, question = documents(config, [3 * config.segment_size, 4], seed=8)
    options = GenerationOptions(max_new_tokens=8, temperature=0.8, seed=3)
    expected = model.run_one(context + question, generate=options).generated_ids
    with TritonClient(decoder_export, server.url, "dec_stream",
                      chunk_tokens=2 * config.segment_size) as client:
        assert client.decoupled
        assert_same(client.run(context).output, model.run_one(context))
        client.run(context, sequence_id=31, end=False)
        made: list[int] = []
        answer = client.generate(31, question, options, end=True, on_token=made.append)
    assert made == answer.ids == expected


def test_a_question_whose_sequence_was_lost_is_asked_again_from_the_kept_state(
        server, decoder_export):
    """The context is read, then the server no longer holds the sequence when the
    question comes (as after a lost replica): the client asks it again as a START with
    the state the context left, and the ids are rmt-run --generate's."""
    model = open_model(decoder_export)
    config = model.config
    context, question = documents(config, [3 * config.segment_size, 4], seed=9)
    options = GenerationOptions(max_new_tokens=6)
    expected = model.run_one(context + question, generate=options).generated_ids
    with TritonClient(decoder_export, server.url, "dec",
                      chunk_tokens=2 * config.segment_size) as client:
        generate, asked = client.generate, []

        def forgotten_once(sequence_id, *args, **kwargs):
            asked.append(kwargs["start"])
            if len(asked) == 1:
                sequence_id += 1  # a sequence this server does not hold
            return generate(sequence_id, *args, **kwargs)

        client.generate = forgotten_once
        result = client.run(context + question, generate=options)
    assert result.output.generated_ids == expected and expected
    assert asked == [False, True]
    assert len(result.retries) == 1 and "START flag" in result.retries[0].reason


def test_a_document_of_one_segment_is_answered_as_a_question(server, decoder_export):
    model = open_model(decoder_export)
    (question,) = documents(model.config, [5], seed=10)
    options = GenerationOptions(max_new_tokens=4)
    with TritonClient(decoder_export, server.url, "dec") as client:
        result = client.run(question, generate=options)
    assert result.output.generated_ids == model.run_one(question, generate=options).generated_ids
    assert not result.retries


def test_an_armt_answers_as_rmt_run(server, armt_export):
    """The published ARMT (every layer's A and z, and ``started``, as state pairs):
    streamed in chunks, its perplexity and state equal rmt-run's; a context read once
    answers as rmt-run --generate, also from its state sent with START. The context is
    whole segments: rmt-run --generate reads a context's short last segment together
    with the question, a context left open has read it alone (on this model the ids of
    the two differ for most documents)."""
    model = open_model(armt_export)
    config = model.config
    document, question = documents(config, [5 * config.segment_size + 2, 4], seed=12)
    context = document[: 5 * config.segment_size]
    options = GenerationOptions(max_new_tokens=6)
    expected = model.run_one(context + question, generate=options).generated_ids
    with TritonClient(armt_export, server.url, "armt", chunk_tokens=2 * config.segment_size,
                      in_flight=2) as client:
        result = client.run(document)
        local = model.run_one(document)
        assert result.output.perplexity == pytest.approx(local.perplexity, rel=1e-5)
        np.testing.assert_allclose(result.output.memory, local.memory, atol=1e-5)  # A.0
        client.run(context, sequence_id=77, end=False)
        answer = client.generate(77, question, options, end=True)
        assert answer.ids == expected
        state = local_state(model, context)
        assert set(answer.state) == set(state) == {pair.name_in for pair in client.pairs}
        for name, array in state.items():  # every layer's A and z, and started
            np.testing.assert_allclose(answer.state[name][0], array, atol=1e-5, err_msg=name)
        again = client.generate(78, question, options, start=True, end=True,
                                state_in=answer.state)
        assert again.ids == expected


def test_a_llama_rmt_answers_as_rmt_run(server, llama_rmt_export):
    """The published plain RMT on Llama (LoRA merged): streamed in chunks, its perplexity
    and memory equal rmt-run's; a context read once answers as rmt-run --generate."""
    model = open_model(llama_rmt_export, threads=1)
    config = model.config
    context, question = documents(config, [3 * config.segment_size, 4], seed=13)
    options = GenerationOptions(max_new_tokens=6)
    expected = model.run_one(context + question, generate=options).generated_ids
    with TritonClient(llama_rmt_export, server.url, "llama",
                      chunk_tokens=2 * config.segment_size) as client:
        assert_same(client.run(context + question).output, model.run_one(context + question))
        client.run(context, sequence_id=88, end=False)
        answer = client.generate(88, question, options, end=True)
    assert answer.ids == expected and expected
    np.testing.assert_allclose(answer.state["memory_in"][0], model.run_one(context).memory,
                               atol=1e-5)
