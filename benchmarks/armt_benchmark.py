"""ARMT part of the decoder benchmark (``decoder_benchmark.py --armt``): a Llama-shaped
ARMT (4 layers, hidden 512, GQA 8/4, vocabulary 32,000, 16 memory tokens, d_mem 64,
segment 512), random weights. The job: read a document of 4 segments (3 written, the
last one prefilled) and answer with 16 greedy tokens, batch 1. rmt-deploy (the export on
ONNX Runtime: write graph, prefill, decode reading (A, z)) against the authors' ARMT code
(``authors_armt.py``) run at its best (``torch.inference_mode``, SDPA attention), in one
process, taking turns at each thread count (1 and 2 by default, both sides alike); the ids
of both must be equal. Also: the state's size and the
peak RSS of ``rmt-run --generate 16``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

sys.path.insert(0, str(Path(__file__).parent))
from authors_armt import authors_armt  # noqa: E402
from machine import load, peak_rss_mb  # noqa: E402
from report import markers  # noqa: E402

from rmt_deploy.contract import state_pairs  # noqa: E402
from rmt_deploy.export.pipeline import ExportOptions, export_checkpoint  # noqa: E402
from rmt_deploy.model.base import build_decoder_base  # noqa: E402
from rmt_deploy.model.checkpoint import save_checkpoint  # noqa: E402
from rmt_deploy.model.factory import SpecialTokens, armt_from_base  # noqa: E402
from rmt_deploy.runtime import open_model  # noqa: E402

LAYERS, HIDDEN, HEADS, KV_HEADS, VOCAB = 4, 512, 8, 4, 32000
M, D_MEM, SEGMENT, SEGMENTS, NEW_TOKENS = 16, 64, 512, 4, 16
BIN = Path(sys.executable).parent


def build(seed: int = 0, sliding_window: bool = False):
    """The reference ARMT (random weights, no EOS so that 16 tokens always come); the
    same weights with or without the sliding window (positions for the window's reach)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        max_position_embeddings=4 * SEGMENT, bos_token_id=None, eos_token_id=None)
    return armt_from_base(build_decoder_base(config), num_mem_tokens=M, d_mem=D_MEM,
                          segment_size=SEGMENT, correction=False, special=SpecialTokens(),
                          sliding_window=sliding_window).eval()


def word_tokenizer(vocab: int = VOCAB) -> str:
    """A word-level tokenizer of ``vocab`` words: id i is the word ``w{i}``."""
    tokenizer = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(vocab)},
                                           unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer.to_str()


def authors_side(rmt):
    """The authors' ARMT over a copy of the base, SDPA attention."""
    wrapper = authors_armt(rmt.model, num_mem_tokens=M, d_mem=D_MEM, segment_size=SEGMENT,
                           correction=False, memory=rmt.memory.detach(),
                           maps=[dict(maps.state_dict()) for maps in rmt.maps])
    wrapper.memory_cell.model.set_attn_implementation("sdpa")
    return wrapper


def run_authors(wrapper, doc: np.ndarray) -> tuple[list[int], float]:
    start = time.perf_counter()
    with torch.inference_mode():
        out = wrapper.generate(torch.from_numpy(doc).view(1, -1), max_new_tokens=NEW_TOKENS,
                               do_sample=False, pad_token_id=0)
    return out[0, -NEW_TOKENS:].tolist(), time.perf_counter() - start


def run_ours(model, doc: np.ndarray) -> tuple[list[int], float]:
    start = time.perf_counter()
    ids = model.run_one(doc, generate=NEW_TOKENS).generated_ids
    return ids, time.perf_counter() - start


def turns(model, wrapper, doc: np.ndarray, repeats: int) -> dict:
    """Both sides taking turns ``repeats`` times (the first run of each a warm-up): their
    median seconds, the speedup, whether their ids are equal, the load after."""
    times: dict[str, list[float]] = {"authors": [], "rmt-deploy": []}
    ids = {}
    for _ in range(repeats):
        ids["authors"], seconds = run_authors(wrapper, doc)
        times["authors"].append(seconds)
        ids["rmt-deploy"], seconds = run_ours(model, doc)
        times["rmt-deploy"].append(seconds)
    median = {side: statistics.median(values[1:] or values) for side, values in times.items()}
    return {"seconds": median, "speedup": median["authors"] / median["rmt-deploy"],
            "ids_equal": ids["authors"] == ids["rmt-deploy"], "load": load()}


def armt_part(repeats: int = 3, work: Path | None = None,
              threads: Sequence[int] = (1, 2)) -> dict:
    """The job on both sides with each count of ``threads`` threads in turn (both sides
    the same count), ``repeats`` turns each."""
    rmt = build()
    with tempfile.TemporaryDirectory() as scratch:
        work = work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        checkpoint = save_checkpoint(rmt, work / "armt.pt", word_tokenizer())
        start = time.perf_counter()
        manifest = export_checkpoint(checkpoint, work / "export",
                                     ExportOptions(validation_segments=4))
        folder = manifest.folder
        validation = manifest.validation["fp32"]
        export_seconds = time.perf_counter() - start
        wrapper = authors_side(rmt)
        doc = np.random.default_rng(1).integers(3, VOCAB, SEGMENTS * SEGMENT)
        runs = {}
        for count in threads:
            torch.set_num_threads(count)  # the export set its own
            model = open_model(folder, backend="onnxruntime", threads=count)
            runs[str(count)] = turns(model, wrapper, doc, repeats)
        text = work / "doc.txt"
        text.write_text(" ".join(f"w{i}" for i in doc) + "\n")
        rss = peak_rss_mb([str(BIN / "rmt-run"), str(folder), str(text), "--generate",
                           str(NEW_TOKENS), "--backend", "onnxruntime", "--json"])
    state_bytes = sum(int(np.prod(p.row_shape)) * 4 for p in state_pairs(rmt.rmt_config))
    return {
        "shape": {"layers": LAYERS, "hidden": HIDDEN, "heads": f"{HEADS}/{KV_HEADS}",
                  "vocab": VOCAB, "memory_tokens": M, "d_mem": D_MEM, "segment": SEGMENT,
                  "segments": SEGMENTS, "new_tokens": NEW_TOKENS},
        "threads": runs, "ids_equal": all(run["ids_equal"] for run in runs.values()),
        "export_seconds": export_seconds, "state_bytes": state_bytes,
        "peak_rss_mb": rss, "load": load(),
        "validation_max_abs": {loop: validation[loop]["max_abs"]
                               for loop in ("open_loop", "closed_loop")},
    }


def markdown(report: dict) -> str:
    """The ``armt`` part of docs/benchmarks.md, with its markers."""
    shape = report["shape"]
    begin, end = markers("armt")
    rows = [f"| {count} | {run['seconds']['authors']:.3f} | {run['seconds']['rmt-deploy']:.3f} "
            f"| {run['speedup']:.2f}x | {run['ids_equal']} | {run['load']} |"
            for count, run in report["threads"].items()]
    return "\n".join([
        begin,
        "## ARMT (decoder_benchmark.py --armt)",
        "",
        f"ARMT, Llama-shaped ({shape['layers']} layers, hidden {shape['hidden']}, heads "
        f"{shape['heads']}, vocabulary {shape['vocab']:,}, {shape['memory_tokens']} memory "
        f"tokens, d_mem {shape['d_mem']}, segment {shape['segment']}), random weights: "
        f"{shape['segments']} segments read, {shape['new_tokens']} greedy tokens, batch 1, "
        "CPU (2 cores shared with other work: the load average is given). Per thread count "
        "both sides use that many threads and take turns; seconds are medians of the job. "
        "With a load near 2, a second thread competes with the other work for a core, "
        "which the authors' torch threads suffer most from.",
        "",
        "| threads | authors' ARMT code (inference_mode, SDPA), s | rmt-deploy, ONNX "
        "Runtime, s | speedup (goal 1.5x) | ids equal | load after |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"State per stream {report['state_bytes'] / 1e6:.2f} MB (FP32); peak RSS of "
        f"rmt-run --generate 16: {report['peak_rss_mb']:.0f} MB; export "
        f"{report['export_seconds']:.0f} s, validated with the default gates (A reaches "
        "~1e5 on this random model, judged relative to its size; closed-loop logits error "
        f"{report['validation_max_abs']['closed_loop']['logits']:.1e}).",
        end,
    ])


if __name__ == "__main__":
    import json

    result = armt_part()
    print(json.dumps(result, indent=2))
    print(markdown(result))
