"""What the sliding window costs an exported ARMT: the same random ARMT (the ARMT
benchmark's shape: 4 layers, hidden 512, GQA 8/4, vocabulary 32,000, 16 memory tokens,
d_mem 64, segment 512) exported without and with the window, then on ONNX Runtime: a
perplexity run of a 4-segment document and ``--generate 16`` after it (batch 1), median
seconds of ``--repeats`` runs, the state's bytes a stream, and whether the greedy ids
equal the reference's (``generate_armt``).

    python benchmarks/armt_window.py [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from armt_benchmark import SEGMENT, VOCAB, build  # noqa: E402
from machine import load  # noqa: E402

from rmt_deploy.contract import state_pairs  # noqa: E402
from rmt_deploy.export.pipeline import ExportOptions, export_checkpoint  # noqa: E402
from rmt_deploy.model.armt import generate_armt  # noqa: E402
from rmt_deploy.model.checkpoint import save_checkpoint  # noqa: E402
from rmt_deploy.runtime import open_model  # noqa: E402

SEGMENTS, NEW_TOKENS = 4, 16


def median_seconds(run, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def measure(sliding_window: bool, work: Path, threads: int, repeats: int) -> dict:
    rmt = build(sliding_window=sliding_window)
    checkpoint = save_checkpoint(rmt, work / f"armt-{int(sliding_window)}.pt", None)
    start = time.perf_counter()
    folder = export_checkpoint(checkpoint, work / f"export-{int(sliding_window)}",
                               ExportOptions(validation_segments=2, threads=threads)).folder
    export_seconds = time.perf_counter() - start
    model = open_model(folder, backend="onnxruntime", threads=threads)
    doc = np.random.default_rng(1).integers(3, VOCAB, SEGMENTS * SEGMENT)
    scoring, _ = median_seconds(lambda: model.run_one(doc), repeats)
    generating, output = median_seconds(lambda: model.run_one(doc, generate=NEW_TOKENS),
                                        repeats)
    return {"export_seconds": round(export_seconds, 1),
            "state_bytes": sum(int(np.prod(p.row_shape)) * 4
                               for p in state_pairs(model.config)),
            "perplexity_seconds": round(scoring, 3), "generate_seconds": round(generating, 3),
            "ids_equal": output.generated_ids == generate_armt(rmt, doc, NEW_TOKENS),
            "load": load()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        report = {name: measure(window, Path(scratch), args.threads, args.repeats)
                  for name, window in (("no window", False), ("window", True))}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
