"""A bounded load test of an RMT served by Triton (loopback only): N concurrent
sequences stream random documents for a fixed time (and at most --max-segments segments
in all), then every client stops by itself, each over gRPC with --chunk-tokens a request
and --in-flight requests unanswered (defaults: one segment a request, one in flight, so
an answer's latency is a segment's). Reports throughput, p50/p99 latency per answer, the
server's RSS (tritonserver and its python-backend stubs) when warm, at the
end, with abandoned sequences open, and after they are evicted as idle, and the errors.
The warm-up lasts until the server's RSS settles (bounded by --warm-up-seconds). Exits 1
if any request failed, an abandoned sequence was not evicted, or the RSS grew past
--rss-slack once warm. Prints one JSON object.

    python scripts/triton_load.py --model EXPORT --url 127.0.0.1:8001 --name rmt \\
        --server-pid PID --idle-seconds 5 --sequences 64 --seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from rmt_deploy.manifest import read_manifest
from rmt_deploy.segmentation import content_id_range, step_inputs
from rmt_deploy.serving.client import Chunk, TritonClient
from rmt_deploy.serving.errors import SequenceLostError

SAMPLE_SECONDS = 5.0  # warm-up: RSS sampled this often
RSS_KINDS = ("RssAnon", "RssFile", "RssShmem")  # their sum is a process's RSS
SETTLED = 0.01  # warm once RSS grows by less than this fraction over WINDOW samples
WINDOW = 2  # one settled sample is not enough: a step can follow it (64 sequences, chunks)


def rss_by_process(pid: int) -> dict[str, int]:
    """Resident memory of ``pid`` and all its descendants, summed by command name
    (tritonserver, triton_python_backend_stub, nginx) and kind (anon: the heap; shmem: the
    python backend's shared-memory pool; file: mapped libraries), to say which grows."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    totals: dict[str, int] = {}
    todo = [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            status = Path(f"/proc/{current}/status").read_text().splitlines()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status if ":" in line)
        if "RssAnon" not in fields:  # a zombie
            continue
        for kind in RSS_KINDS:  # "12345 kB"
            key = f"{fields['Name'].strip()} {kind[3:].lower()}"
            totals[key] = totals.get(key, 0) + int(fields[kind].split()[0]) * 1024
    return totals


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants."""
    return sum(rss_by_process(pid).values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="export folder")
    parser.add_argument("--url", default="127.0.0.1:8001", help="gRPC address")
    parser.add_argument("--name", default="rmt")
    parser.add_argument("--server-pid", type=int, required=True, help="tritonserver's pid")
    parser.add_argument("--idle-seconds", type=float, required=True,
                        help="the repository's idle timeout (rmt-triton --idle-seconds)")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-segments", type=int, default=1_000_000,
                        help="segments of the load phase at most (the warm-up is bounded "
                             "by --warm-up-seconds)")
    parser.add_argument("--tokens", type=int, default=400, help="tokens per document")
    parser.add_argument("--chunk-tokens", type=int, default=0,
                        help="tokens a request carries (0: one segment)")
    parser.add_argument("--in-flight", type=int, default=1,
                        help="requests sent before the first is answered")
    parser.add_argument("--rss-slack", type=float, default=0.10,
                        help="allowed RSS growth once warm, as a fraction")
    parser.add_argument("--warm-up-seconds", type=float, default=60.0,
                        help="longest warm-up: it ends once the server's RSS grows by "
                             f"less than {SETTLED:.0%} over {WINDOW * SAMPLE_SECONDS:g} s")
    args = parser.parse_args()
    host = args.url.rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"triton_load.py: loopback only, got --url {args.url}")

    config = read_manifest(args.model).config
    low, high = content_id_range(config)
    count = args.sequences
    latencies: list[list[float]] = [[] for _ in range(count)]
    errors: list[str] = []
    evicted: list[int] = []
    budget = threading.Semaphore(args.max_segments)
    phase = threading.Barrier(count + 1, timeout=args.seconds + 300)  # workers + this thread
    until = [0.0]
    tokens = np.arange(low, low + 4)
    ids, mask = step_inputs([tokens], config)
    segments = [0] * count  # segments answered in the load phase, per client
    options = dict(chunk_tokens=args.chunk_tokens or config.segment_size,
                   in_flight=args.in_flight, retry=None)

    def stream(client: TritonClient, rng, row: list[float], index: int | None) -> None:
        send = client.send

        def timed(chunks):
            sizes: list[int] = []  # segments of each chunk sent, not yet answered

            def budgeted():
                for chunk in chunks:
                    for _ in range(len(chunk.input_ids)):  # a segment each, once loading
                        if index is not None and not budget.acquire(blocking=False):
                            raise _Done
                    sizes.append(len(chunk.input_ids))
                    yield chunk

            last = time.perf_counter()
            for answer in send(budgeted()):
                now = time.perf_counter()
                row.append(now - last)  # the wait for this answer after the one before
                last, size = now, sizes.pop(0)
                if index is not None:
                    segments[index] += size
                yield answer

        client.send = timed
        try:
            while time.monotonic() < until[0]:
                try:
                    client.run(rng.integers(low, high, size=args.tokens).tolist())
                except _Done:
                    return
                except Exception as error:  # counted and reported, the load goes on
                    errors.append(f"{type(error).__name__}: {error}")
        finally:
            client.send = send

    def worker(index: int) -> None:
        with TritonClient(args.model, args.url, args.name, **options) as client:
            rng = np.random.default_rng(index)
            phase.wait()  # warm-up
            stream(client, rng, [], None)
            phase.wait()
            phase.wait()  # load
            stream(client, rng, latencies[index], index)
            phase.wait()
            sequence = 10**12 + index  # abandoned: started, never ended
            client.step(Chunk(sequence, ids, mask, start=True, end=False))
            phase.wait()
            phase.wait()  # the store has evicted idle sequences
            try:
                client.step(Chunk(sequence, ids, mask, start=False, end=True))
            except SequenceLostError:
                evicted.append(sequence)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    until[0] = time.monotonic() + args.warm_up_seconds
    phase.wait()  # warm-up: every client streams, the server's pools grow
    warm_up = settle(args.server_pid, until, args.warm_up_seconds)
    phase.wait()
    warm_by_process = rss_by_process(args.server_pid)
    warm = sum(warm_by_process.values())
    until[0] = time.monotonic() + args.seconds
    started = time.perf_counter()
    phase.wait()
    samples = []  # RSS every 10 s of the load: flat once warm, or growing
    while (left := until[0] - time.monotonic()) > 0:
        time.sleep(min(10.0, left))
        samples.append(rss_bytes(args.server_pid))
    phase.wait()
    seconds = time.perf_counter() - started
    end_by_process = rss_by_process(args.server_pid)
    end = sum(end_by_process.values())
    phase.wait()
    with_open = rss_bytes(args.server_pid)
    time.sleep(args.idle_seconds + 1.5)
    with TritonClient(args.model, args.url, args.name, **options) as client:
        client.step(Chunk(1, ids, mask, start=True, end=True))  # the store evicts here
    phase.wait()
    for thread in threads:
        thread.join()
    after = rss_bytes(args.server_pid)
    every = np.concatenate([np.asarray(row) for row in latencies if row] or [np.zeros(0)])
    abandoned = count

    mib = 1 << 20
    report = {
        "sequences": count, "chunk_tokens": options["chunk_tokens"],
        "in_flight": args.in_flight, "seconds": round(seconds, 2),
        "segments": sum(segments), "answers": int(every.size),
        "segments_per_second": round(sum(segments) / seconds, 1),
        "p50_ms": round(float(np.percentile(every, 50)) * 1e3, 2) if every.size else None,
        "p99_ms": round(float(np.percentile(every, 99)) * 1e3, 2) if every.size else None,
        "errors": len(errors), "first_errors": errors[:3],
        "warm_up_seconds": round(warm_up, 1), "rss_warm_mib": round(warm / mib, 1),
        "rss_end_mib": round(end / mib, 1),
        "rss_warm_end_by_process_mib": {
            name: [round(warm_by_process.get(name, 0) / mib, 1),
                   round(end_by_process.get(name, 0) / mib, 1)]
            for name in sorted(warm_by_process.keys() | end_by_process.keys())},
        "rss_every_10s_mib": [round(sample / mib, 1) for sample in samples],
        "rss_with_abandoned_mib": round(with_open / mib, 1),
        "rss_after_eviction_mib": round(after / mib, 1),
        "abandoned": abandoned, "evicted": len(evicted),
        "load_average": os.getloadavg(),
    }
    print(json.dumps(report))
    grew = max(end, after) > warm * (1 + args.rss_slack)
    return 1 if errors or len(evicted) != abandoned or grew else 0


def settle(pid: int, until: list[float], longest: float) -> float:
    """Sample ``pid``'s RSS every SAMPLE_SECONDS while the clients warm up, and end the
    warm-up (``until[0]``: the clients finish their document and stop) once it grew by
    less than SETTLED over the last WINDOW samples, or after ``longest`` seconds;
    returns the warm-up's seconds."""
    started = time.monotonic()
    samples = [rss_bytes(pid)]
    while time.monotonic() - started < longest:
        time.sleep(min(SAMPLE_SECONDS, max(0.0, longest - (time.monotonic() - started))))
        samples.append(rss_bytes(pid))
        if len(samples) > WINDOW and samples[-1] <= samples[-1 - WINDOW] * (1 + SETTLED):
            break
    until[0] = time.monotonic()
    return time.monotonic() - started


class _Done(Exception):
    """The segment budget is spent."""


if __name__ == "__main__":
    sys.exit(main())
