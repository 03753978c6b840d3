"""Two tritonserver replicas behind nginx (scripts/triton_replicas.sh): a replica SIGKILLed
in the middle of the documents loses nothing (the client restarts each lost sequence from
its last state on the other replica), a server restarted under a running client is
retried within the bound, and a balancer that refuses connections is a one-line error.

Skipped like tests/test_triton_server.py when .venv-triton or nginx is absent, unless
RMT_REQUIRE_TRITON=1 (CI)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")

from test_triton_server import ROOT, Server, _require_venv, assert_same, documents, free_ports  # noqa: E402, I001

from rmt_deploy.runtime import open_model  # noqa: E402
from rmt_deploy.serving.client import SEQUENCE_HEADER, Chunk, TritonClient  # noqa: E402
from rmt_deploy.serving.config import ServingOptions  # noqa: E402
from rmt_deploy.contract import ATTENTION_MASK, INPUT_IDS, LOGITS  # noqa: E402
from rmt_deploy.segmentation import count_segments, segment_range, step_inputs  # noqa: E402
from rmt_deploy.serving.errors import SequenceLostError, ServingError  # noqa: E402
from rmt_deploy.serving.failover import RetryPolicy  # noqa: E402
from rmt_deploy.serving.progress import load_progress  # noqa: E402
from rmt_deploy.serving.repository import write_repository  # noqa: E402


def _require_nginx() -> None:
    if shutil.which("nginx") or Path("/usr/sbin/nginx").is_file():
        return
    message = "nginx is not installed: run bash scripts/setup_triton.sh"
    if os.environ.get("RMT_REQUIRE_TRITON") == "1":
        pytest.fail(message)
    pytest.skip(message)


class Replicas:
    """scripts/triton_replicas.sh: replicas + nginx (HTTP and gRPC), ready when
    constructed. ``url`` is the balancer's gRPC address (the client's), ``http_url`` its
    HTTP one."""

    def __init__(self, repo: Path, run: Path, count: int = 2) -> None:
        self.run = run
        http, grpc = free_ports(count + 1), free_ports(count + 1)
        specs = [f"{h}:{g}" for h, g in zip(http, grpc, strict=True)]  # HTTP:GRPC each
        self.url, self.http_url = f"127.0.0.1:{grpc[0]}", f"127.0.0.1:{http[0]}"
        # the balancer logs a replica by its gRPC address; the script names it by HTTP port
        self.names = {f"127.0.0.1:{g}": f"replica-{h}" for h, g in zip(http[1:], grpc[1:],
                                                                         strict=True)}
        self.log = run.parent / f"{run.name}.log"
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                ["bash", str(ROOT / "scripts" / "triton_replicas.sh"), str(repo), str(run),
                 *specs],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while not (run / "ready").exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"triton_replicas.sh did not get ready: {self.log.read_text()}")
            time.sleep(0.2)

    def pid(self, name: str) -> int:
        return int((self.run / f"{name}.pid").read_text())

    def kill(self, address: str) -> None:
        """SIGKILL the replica the balancer reaches at ``address``."""
        os.kill(self.pid(self.names[address]), signal.SIGKILL)

    def served(self, sequence: int | None = None, count: int = 1) -> list[tuple[int, str, str]]:
        """(sequence id, the last replica tried, HTTP status) of every request (for gRPC,
        every stream or call) the balancer passed on; with ``sequence``, that sequence's
        only, once at least ``count`` are logged (nginx logs a stream after it closed)."""
        deadline = time.monotonic() + 10
        while True:
            rows = []
            for line in (self.run / "nginx-access.log").read_text().splitlines():
                fields = line.split()  # sequence, upstreams tried ("a, b"), status, seconds
                if fields[0] != "-":
                    rows.append((int(fields[0]), fields[-3], fields[-2]))
            if sequence is None:
                return rows
            mine = [row for row in rows if row[0] == sequence]
            if len(mine) >= count or time.monotonic() > deadline:
                return mine
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM the script: it stops nginx and the replicas, and exits."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="module")
def repo(encoder_export, tmp_path_factory) -> Path:
    _require_venv()
    _require_nginx()
    repo = tmp_path_factory.mktemp("triton-replicas") / "repo"
    write_repository(repo, encoder_export, ServingOptions(name="enc", max_batch_size=8))
    return repo


def answering(client: TritonClient, after: int, act) -> None:
    """Make ``client`` call ``act()`` once, when ``after`` chunks are answered, before
    passing on the next answer (chunks sent after them may be answered already)."""
    send, done = client.send, []

    def acting(chunks):
        for answer in send(chunks):
            if len(done) == after:
                act()
            done.append(1)
            yield answer

    client.send = acting


def test_a_replica_lost_mid_document_loses_nothing(repo, encoder_export, tmp_path):
    model = open_model(encoder_export)
    size = model.config.segment_size
    docs = documents(model.config, [300, 280, 260, 240], seed=11)
    local = model.run(docs).outputs
    replicas = Replicas(repo, tmp_path / "run")
    killed: dict[str, object] = {}
    try:
        with TritonClient(encoder_export, replicas.url, "enc") as probe:
            probe.run(docs[0][:size], sequence_id=1000)  # where the hash puts sequence 1000
        (holder,) = {address for _, address, _ in replicas.served(1000)}

        def kill() -> None:
            replicas.kill(holder)
            killed.update(at=time.monotonic())

        def stream(index: int):
            with TritonClient(encoder_export, replicas.url, "enc", chunk_tokens=2 * size,
                              in_flight=2) as client:
                if index == 0:  # this client kills its sequence's replica after 4 chunks
                    answering(client, 4, kill)
                    answering(client, 5, lambda: killed.update(back=time.monotonic()))
                return client.run(docs[index], progress_file=tmp_path / f"doc{index}.progress",
                                  sequence_id=1000 + index)

        results: list = [None] * len(docs)
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, stream(i)))
                   for i in range(len(docs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(result is not None for result in results), "a document failed; see the log"
        streams = replicas.served(1000, count=2)  # the probe's stream and the document's
        served = replicas.served(results[0].retries[-1].restarted_as if results[0].retries
                                 else 1000)
    finally:
        replicas.stop()
    for index, (result, expected) in enumerate(zip(results, local, strict=True)):
        assert_same(result.output, expected)  # every answer equals rmt-run's
        saved = load_progress(tmp_path / f"doc{index}.progress", model.config)
        assert saved.next_segment == expected.segments  # no progress file corrupted
        np.testing.assert_allclose(saved.state["memory_in"], expected.memory, atol=1e-5)
    # The killed replica's sequence was restarted on the other one from its last state:
    # after the 4 chunks passed on, and the chunks answered before the kill
    first = results[0]
    assert first.retries, "the client did not retry"
    (segment,) = {retry.segment for retry in first.retries}
    assert segment >= 4 * 2 and segment % 2 == 0
    assert [address for _, address, _ in streams] == [holder, holder]  # probe, document
    # it went on under a new correlation id, answered by the other replica only
    after = {address for _, address, status in served if status == "200"}
    assert len(after) == 1 and holder not in after
    delay = sum(retry.waited for retry in first.retries)
    assert delay <= RetryPolicy().bound()
    print(f"\nreplica {holder} SIGKILLed after segment {segment} of sequence 1000 (gRPC, "
          f"2 segments a chunk, 2 in flight): {len(first.retries)} retries, {delay:.2f} s "
          f"waited, answered again {killed['back'] - killed['at']:.2f} s after the kill; "
          f"all {sum(len(r.retries) > 0 for r in results)} affected sequences equal rmt-run")


def test_server_restarted_under_a_running_client_is_retried(repo, encoder_export, tmp_path):
    model = open_model(encoder_export)
    (doc,) = documents(model.config, [240], seed=12)
    server = Server(repo, tmp_path / "triton.log")
    port = server.url.rsplit(":", 1)[1]
    restarted: list[Server] = []

    def start_again() -> None:
        restarted.append(FixedPortServer(repo, tmp_path / "triton2.log", port))

    starting = threading.Thread(target=start_again)
    policy = RetryPolicy(attempts=12, backoff=0.25, max_wait=2.0)  # ~19 s: a restart fits
    size = model.config.segment_size

    def restart() -> None:  # the server goes down, and starts again meanwhile
        server.stop()
        starting.start()

    try:
        with TritonClient(encoder_export, server.url, "enc", retry=policy,
                          chunk_tokens=2 * size, in_flight=1) as client:
            answering(client, 3, restart)
            result = client.run(doc)
    finally:
        server.stop()
        if starting.is_alive():
            starting.join()
        for other in restarted:
            other.stop()
    # one chunk in flight: the 4th answer was in before the stop, the 5th chunk is lost
    assert result.retries and {retry.segment for retry in result.retries} == {8}
    assert_same(result.output, model.run_one(doc))
    print(f"\nserver restarted under the client: {len(result.retries)} retries, "
          f"{sum(r.waited for r in result.retries):.2f} s waited")


class FixedPortServer(Server):
    """A tritonserver on a given gRPC port (a restart in place)."""

    def __init__(self, repo: Path, log: Path, port: str) -> None:
        http, metrics = free_ports(2)
        self.http, self.url, self.log = f"127.0.0.1:{http}", f"127.0.0.1:{port}", log
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                ["bash", str(ROOT / "scripts" / "triton_serve.sh"), str(repo),
                 "--http-port", str(http), "--grpc-port", port, "--metrics-port",
                 str(metrics), "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1",
                 "--exit-timeout-secs", "1"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(repo)


def test_a_balancer_that_refuses_connections_is_a_bounded_one_line_error(
        repo, encoder_export, tmp_path):
    model = open_model(encoder_export)
    (doc,) = documents(model.config, [240], seed=13)
    progress = tmp_path / "doc.progress"
    replicas = Replicas(repo, tmp_path / "run")
    policy = RetryPolicy(attempts=3, backoff=0.1, max_wait=0.2)
    size = model.config.segment_size

    def stop_balancer() -> None:  # nginx stops: its port refuses connections
        os.kill(replicas.pid("nginx"), signal.SIGTERM)
        while _listening(replicas.url):
            time.sleep(0.05)

    try:
        with TritonClient(encoder_export, replicas.url, "enc", retry=policy,
                          chunk_tokens=2 * size, in_flight=1) as client:
            # what the failover restarts and what it leaves alone, through the balancer
            ids, mask = step_inputs([np.asarray(doc[:10])], model.config)
            with pytest.raises(SequenceLostError, match="must specify the START flag"):
                client.step(Chunk(4242, ids, mask, False, False))  # moved or forgotten
            with pytest.raises(ServingError, match="token ids must lie in") as bad:
                client.step(Chunk(4243, ids + model.config.vocab_size, mask, True, True))
            assert not isinstance(bad.value, SequenceLostError)
            answering(client, 2, stop_balancer)
            started = time.monotonic()
            with pytest.raises(ServingError) as error:
                client.run(doc, progress_file=progress)
            waited = time.monotonic() - started
    finally:
        replicas.stop()
    message = str(error.value)
    assert "\n" not in message
    assert f"cannot reach Triton at {replicas.url}" in message
    assert "gave up after 3 tries" in message
    # intact, resumable: the 3rd answer was in before the stop, the 4th chunk is lost
    assert load_progress(progress, model.config).next_segment == 6
    print(f"\nbalancer refused: {message} (after {waited:.2f} s)")


def _listening(url: str) -> bool:
    host, port = url.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True



def test_the_replica_script_refuses_a_used_run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "mine.txt").write_text("not the script's")
    script = str(ROOT / "scripts" / "triton_replicas.sh")
    used = subprocess.run(["bash", script, str(tmp_path), str(run), "1", "2"],
                          capture_output=True, text=True, timeout=30)
    short = subprocess.run(["bash", script, str(tmp_path)], capture_output=True, text=True,
                           timeout=30)
    if shutil.which("nginx") or Path("/usr/sbin/nginx").is_file():
        assert used.returncode == 1 and f"{run} is not empty" in used.stderr
    assert used.stderr.count("\n") == 1 and used.stdout == ""
    assert sorted(p.name for p in run.iterdir()) == ["mine.txt"]  # nothing added or removed
    assert short.returncode == 2 and short.stderr.startswith("usage:")


def test_grpc_through_the_balancer_keeps_a_sequence_on_one_replica(repo, encoder_export,
                                                                    tmp_path):
    import tritonclient.grpc as grpc

    model = open_model(encoder_export)
    config = model.config
    (doc,) = documents(config, [90], seed=14)
    total = count_segments(len(doc), config)
    replicas = Replicas(repo, tmp_path / "run")
    try:
        client = grpc.InferenceServerClient(replicas.url)
        for index in range(total):
            ids, mask = step_inputs([np.asarray(doc[slice(*segment_range(len(doc), index,
                                                                         config))])], config)
            inputs = []
            for name, array in ((INPUT_IDS, ids[None]), (ATTENTION_MASK, mask[None])):
                inputs.append(grpc.InferInput(name, list(array.shape), "INT64"))
                inputs[-1].set_data_from_numpy(array)
            result = client.infer("enc", inputs, outputs=[grpc.InferRequestedOutput(LOGITS)],
                                  sequence_id=77, sequence_start=index == 0,
                                  sequence_end=index == total - 1,
                                  headers={SEQUENCE_HEADER: "77"})
        client.close()
        served = replicas.served(77, count=total)
    finally:
        replicas.stop()
    np.testing.assert_allclose(result.as_numpy(LOGITS)[0, -1], model.run_one(doc).logits,
                               atol=1e-5)
    route = [(address, status) for sequence, address, status in served if sequence == 77]
    assert len(route) == total > 3 and len(set(route)) == 1
