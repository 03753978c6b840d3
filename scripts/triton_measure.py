"""Measure an RMT served by Triton against the local runtime on the same export:
sequences served, segments/s of one sequence and of N concurrent ones, the largest
logit difference, and (where the server returns the memory) resume equality after a
client stops mid-document. Prints one JSON object.

    python scripts/triton_measure.py --model out/demo-export --url 127.0.0.1:8000 --name rmt
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path

import numpy as np

from rmt_deploy.runtime import open_model
from rmt_deploy.segmentation import content_id_range
from rmt_deploy.serving.client import TritonClient, stream_concurrently


class _Stop(Exception):
    """Raised by the measuring client to stop mid-document."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="export folder")
    parser.add_argument("--url", default="127.0.0.1:8000")
    parser.add_argument("--name", default="rmt")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--segments", type=int, default=200, help="longest document")
    args = parser.parse_args()

    local_model = open_model(args.model)
    config = local_model.config
    low, high = content_id_range(config)
    rng = np.random.default_rng(0)
    lengths = np.linspace(args.segments // 2, args.segments, args.sequences).astype(int)
    docs = [rng.integers(low, high, size=int(n) * config.segment_size).tolist() for n in lengths]
    local = local_model.run(docs).outputs

    with TritonClient(args.model, args.url, args.name) as client:
        single = client.run(docs[-1])
        keeps_memory = client.keeps_memory
    served, seconds = stream_concurrently(args.model, args.url, args.name, docs)
    segments = sum(result.segments_sent for result in served)
    key = "logits" if config.is_encoder else "perplexity"
    differences = [np.abs(np.asarray(getattr(s.output, key)) - getattr(o, key)).max()
                   for s, o in zip(served, local, strict=True)]
    report = {
        "model": str(args.model), "server": f"{args.url}/{args.name}",
        "sequences_served": len(served) + 1, "concurrent_sequences": len(served),
        "segments": segments, "one_sequence_segments_per_s": round(single.segments_per_second),
        "concurrent_segments_per_s": round(segments / seconds),
        "speedup": round(segments / seconds / single.segments_per_second, 2),
        f"max_{key}_difference": float(max(differences)),
    }
    if not keeps_memory:
        report["resume_equal"] = _resume_equal(args, docs[0], local[0], key)
    print(json.dumps(report))


def _resume_equal(args, doc, expected, key: str) -> bool:
    """Stop a client after a third of the document, resume from its progress file."""
    with tempfile.TemporaryDirectory() as folder, TritonClient(
            args.model, args.url, args.name) as client:
        progress = Path(folder) / "progress.npz"
        step, calls = client.step, []

        def stop_after_a_third(*call, **kwargs):
            calls.append(1)
            if len(calls) > expected.segments // 3:
                raise _Stop
            return step(*call, **kwargs)

        client.step = stop_after_a_third
        with contextlib.suppress(_Stop):
            client.run(doc, progress_file=progress)
        client.step = step
        result = client.run(doc, progress_file=progress)
    return bool(np.allclose(getattr(result.output, key), getattr(expected, key), atol=1e-5))


if __name__ == "__main__":
    main()
