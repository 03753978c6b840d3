"""Measure an RMT served by Triton against the local runtime on the same export, in one
run: one document through Triton against rmt-run's ``run_one`` (goal: at most 1.25x
its time), and N concurrent documents through Triton against a local SessionPool of N
sessions (goal: at least its aggregate tokens/s). Every served answer is checked equal
to the local one. Prints one JSON object, with the load average before and after.

    python scripts/triton_measure.py --model out/demo-export --url 127.0.0.1:8001 --name rmt
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from rmt_deploy.runtime import SessionPool, open_model
from rmt_deploy.segmentation import content_id_range
from rmt_deploy.serving.client import TritonClient, stream_concurrently


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="export folder")
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    parser.add_argument("--name", default="rmt")
    parser.add_argument("--tokens", type=int, default=50_000, help="the one document's tokens")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--concurrent-tokens", type=int, default=10_000,
                        help="longest concurrent document (they range from half to this)")
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--in-flight", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="best of this many")
    args = parser.parse_args()

    load = os.getloadavg()
    model = open_model(args.model)
    config = model.config
    low, high = content_id_range(config)
    rng = np.random.default_rng(0)
    document = rng.integers(low, high, size=args.tokens).tolist()
    lengths = np.linspace(args.concurrent_tokens // 2, args.concurrent_tokens, args.sequences)
    documents = [rng.integers(low, high, size=int(n)).tolist() for n in lengths]
    key = "logits" if config.is_encoder else "perplexity"

    local_one, local = _best(args.repeat, lambda: model.run_one(document))
    with TritonClient(args.model, args.url, args.name, chunk_tokens=args.chunk_tokens,
                      in_flight=args.in_flight) as client:
        served_one, served = _best(args.repeat, lambda: client.run(document).output)
    pool_seconds, pooled = _best(args.repeat, lambda: _pool(model, documents))
    streamed = [stream_concurrently(args.model, args.url, args.name, documents,
                                    chunk_tokens=args.chunk_tokens, in_flight=args.in_flight)
                for _ in range(args.repeat)]
    results, triton_seconds = min(streamed, key=lambda run: run[1])
    served_all = [served] + [r.output for r in results]
    local_all = [local] + pooled
    difference = max(float(np.abs(np.asarray(getattr(s, key)) - getattr(o, key)).max())
                     for s, o in zip(served_all, local_all, strict=True))
    tokens = sum(len(d) for d in documents)
    print(json.dumps({
        "model": args.model, "server": f"{args.url}/{args.name}",
        "load_before": [round(x, 2) for x in load],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "chunk_tokens": args.chunk_tokens, "in_flight": args.in_flight,
        "one_document": {"tokens": args.tokens, "rmt_run_s": round(local_one, 3),
                         "triton_s": round(served_one, 3),
                         "ratio": round(served_one / local_one, 3), "goal": "<= 1.25"},
        "concurrent": {"documents": args.sequences, "tokens": tokens,
                       "session_pool_tokens_per_s": round(tokens / pool_seconds),
                       "triton_tokens_per_s": round(tokens / triton_seconds),
                       "ratio": round(pool_seconds / triton_seconds, 3), "goal": ">= 1"},
        f"max_{key}_difference": difference,
    }))


def _best(repeat: int, work):
    """The fastest of ``repeat`` runs of ``work``: (seconds, its result)."""
    best = None
    for _ in range(repeat):
        started = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - started
        if best is None or seconds < best[0]:
            best = (seconds, result)
    return best


def _pool(model, documents: list[list[int]]) -> list:
    """Every document fed to its own session of one SessionPool from its own thread,
    in pieces of a few segments, as a server's clients would feed it."""
    piece = 4 * model.config.segment_size
    with SessionPool(model) as pool:

        def feed(document: list[int]):
            session = pool.open(total_tokens=len(document))
            for start in range(0, len(document), piece):
                pool.feed(session, document[start:start + piece])
            return pool.close(session)

        with ThreadPoolExecutor(max_workers=len(documents)) as threads:
            return list(threads.map(feed, documents))


if __name__ == "__main__":
    main()
