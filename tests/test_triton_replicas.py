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

pytest.importorskip("tritonclient.http")

from test_triton_server import ROOT, Server, _require_venv, assert_same, documents, free_ports  # noqa: E402, I001

from rmt_deploy.runtime import open_model  # noqa: E402
from rmt_deploy.serving.client import SEQUENCE_HEADER, TritonClient  # noqa: E402
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
    """scripts/triton_replicas.sh: replicas + nginx, ready when constructed."""

    def __init__(self, repo: Path, run: Path, count: int = 2, grpc: bool = False) -> None:
        self.run = run
        balancer, *ports = free_ports(count + 1)
        specs = [str(port) for port in [balancer, *ports]]
        if grpc:  # HTTP:GRPC for the balancer and each replica
            specs = [f"{spec}:{port}" for spec, port in zip(specs, free_ports(count + 1),
                                                             strict=True)]
            self.grpc_url = f"127.0.0.1:{specs[0].split(':')[1]}"
        self.url = f"127.0.0.1:{balancer}"
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

    def served(self) -> list[tuple[int, str, str]]:
        """(sequence id, the last replica tried, HTTP status) of every request the
        balancer passed on."""
        rows = []
        for line in (self.run / "nginx-access.log").read_text().splitlines():
            fields = line.split()  # sequence, upstreams tried ("a, b"), status, seconds
            if fields[0] != "-":
                rows.append((int(fields[0]), fields[-3], fields[-2]))
        return rows

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


def test_a_replica_lost_mid_document_loses_nothing(repo, encoder_export, tmp_path):
    model = open_model(encoder_export)
    docs = documents(model.config, [300, 280, 260, 240], seed=11)
    local = model.run(docs).outputs
    replicas = Replicas(repo, tmp_path / "run")
    killed: dict[str, object] = {}
    try:
        def stream(index: int):
            with TritonClient(encoder_export, replicas.url, "enc") as client:
                if index == 0:  # this client kills its sequence's replica after 10 segments
                    step, sent = client.step, []

                    def step_then_kill(sequence_id, *args, **kwargs):
                        if len(sent) == 10 and not killed:
                            holder = {a for s, a, _ in replicas.served() if s == sequence_id}
                            (address,) = holder
                            port = address.rsplit(":", 1)[1]
                            os.kill(replicas.pid(f"replica-{port}"), signal.SIGKILL)
                            killed.update(address=address, at=time.monotonic())
                        sent.append(sequence_id)
                        answer = step(sequence_id, *args, **kwargs)
                        if killed:
                            killed.setdefault("back", time.monotonic())
                        return answer

                    client.step = step_then_kill
                return client.run(docs[index], progress_file=tmp_path / f"doc{index}.progress",
                                  sequence_id=1000 + index)

        results: list = [None] * len(docs)
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, stream(i)))
                   for i in range(len(docs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        served = replicas.served()
    finally:
        replicas.stop()
    assert all(result is not None for result in results), "a document failed; see the log"
    for index, (result, expected) in enumerate(zip(results, local, strict=True)):
        assert_same(result.output, expected)  # every answer equals rmt-run's
        saved = load_progress(tmp_path / f"doc{index}.progress", model.config)
        assert saved.next_segment == expected.segments  # no progress file corrupted
        np.testing.assert_allclose(saved.state["memory_in"], expected.memory, atol=1e-5)
    # The killed replica's sequence was restarted on the other one from its last state.
    first = results[0]
    assert first.retries, "the client did not retry"
    assert {retry.segment for retry in first.retries} == {10}
    before = [(address, status) for sequence, address, status in served if sequence == 1000]
    assert before[:10] == [(killed["address"], "200")] * 10
    assert len(before) == 11  # the 11th went to the killed replica and failed
    # it went on under a new correlation id, answered by the other replica only
    after = {(address, status) for sequence, address, status in served
             if sequence == first.retries[-1].restarted_as and status == "200"}
    assert len(after) == 1 and killed["address"] not in after.pop()
    delay = sum(retry.waited for retry in first.retries)
    assert delay <= RetryPolicy().bound()
    print(f"\nreplica {killed['address']} SIGKILLed at segment 10 of sequence 1000: "
          f"{len(first.retries)} retries, {delay:.2f} s waited, answered again "
          f"{killed['back'] - killed['at']:.2f} s after the kill; all "
          f"{sum(len(r.retries) > 0 for r in results)} affected sequences equal rmt-run")


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
    try:
        with TritonClient(encoder_export, server.url, "enc", retry=policy) as client:
            step, sent = client.step, []

            def step_then_restart(*args, **kwargs):
                if len(sent) == 8:  # the server goes down, and starts again meanwhile
                    server.stop()
                    starting.start()
                sent.append(1)
                return step(*args, **kwargs)

            client.step = step_then_restart
            result = client.run(doc)
    finally:
        server.stop()
        if starting.is_alive():
            starting.join()
        for other in restarted:
            other.stop()
    assert result.retries and {retry.segment for retry in result.retries} == {8}
    assert_same(result.output, model.run_one(doc))
    print(f"\nserver restarted under the client: {len(result.retries)} retries, "
          f"{sum(r.waited for r in result.retries):.2f} s waited")


class FixedPortServer(Server):
    """A tritonserver on a given HTTP port (a restart in place)."""

    def __init__(self, repo: Path, log: Path, port: str) -> None:
        grpc, metrics = free_ports(2)
        self.url, self.log = f"127.0.0.1:{port}", log
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                ["bash", str(ROOT / "scripts" / "triton_serve.sh"), str(repo),
                 "--http-port", port, "--grpc-port", str(grpc), "--metrics-port",
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
    try:
        with TritonClient(encoder_export, replicas.url, "enc", retry=policy) as client:
            # what the failover restarts and what it leaves alone, through the balancer
            ids, mask = step_inputs([np.asarray(doc[:10])], model.config)
            with pytest.raises(SequenceLostError, match="must specify the START flag"):
                client.step(4242, ids, mask, start=False, end=False)  # moved or forgotten
            with pytest.raises(ServingError, match="token ids must lie in") as bad:
                client.step(4243, ids + model.config.vocab_size, mask, start=True, end=True)
            assert not isinstance(bad.value, SequenceLostError)
            step, sent = client.step, []

            def step_then_stop_balancer(*args, **kwargs):
                if len(sent) == 6:  # nginx stops: its port refuses connections
                    os.kill(replicas.pid("nginx"), signal.SIGTERM)
                    while _listening(replicas.url):
                        time.sleep(0.05)
                sent.append(1)
                return step(*args, **kwargs)

            client.step = step_then_stop_balancer
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
    assert load_progress(progress, model.config).next_segment == 6  # intact, resumable
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
    replicas = Replicas(repo, tmp_path / "run", grpc=True)
    try:
        client = grpc.InferenceServerClient(replicas.grpc_url)
        for index in range(total):
            ids, mask = step_inputs([np.asarray(doc[slice(*segment_range(len(doc), index,
                                                                         config))])], config)
            inputs = []
            for name, array in ((INPUT_IDS, ids), (ATTENTION_MASK, mask)):
                inputs.append(grpc.InferInput(name, list(array.shape), "INT64"))
                inputs[-1].set_data_from_numpy(array)
            result = client.infer("enc", inputs, outputs=[grpc.InferRequestedOutput(LOGITS)],
                                  sequence_id=77, sequence_start=index == 0,
                                  sequence_end=index == total - 1,
                                  headers={SEQUENCE_HEADER: "77"})
        client.close()
        served = replicas.served()
    finally:
        replicas.stop()
    np.testing.assert_allclose(result.as_numpy(LOGITS)[0], model.run_one(doc).logits,
                               atol=1e-5)
    route = [(address, status) for sequence, address, status in served if sequence == 77]
    assert len(route) == total > 3 and len(set(route)) == 1
