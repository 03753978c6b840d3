"""Decoder RMT benchmark: a GPT-2-small-shaped RMT (12 layers, hidden 768, vocabulary
50,257, 16 memory tokens, segment 256) in the authors' pytorch_model.bin layout, random
weights. The job: read 4 segments, then answer with 16 greedy tokens. rmt-deploy (the
exported graphs on ONNX Runtime: write graph for the segments read, KV-cache prefill and
decode) against the plain PyTorch loop and the authors' inference
(benchmarks/authors_decoder.py; the ids of both checked against the authors'), in one
process, taking turns: read time, prefill, time per generated token, total, whether the
tokens are equal, batch 1 and 4; plus the export's size and rmt-run's peak RSS.

    python benchmarks/decoder_benchmark.py      # docs/decoder-benchmark.json, benchmarks.md
    python benchmarks/decoder_benchmark.py --large         # + a 2.15 GB model exported
    python benchmarks/decoder_benchmark.py --armt          # the ARMT part instead

``--large`` exports a GPT-2 of 24 layers of 1,280 (2.15 GB of weights, past protobuf's
2 GB limit) and checks its export is one hashed weights file.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

sys.path.insert(0, str(Path(__file__).parent))
from armt_benchmark import armt_part  # noqa: E402
from armt_benchmark import markdown as armt_markdown  # noqa: E402
from authors_decoder import AuthorsDecoder, PlainDecoder  # noqa: E402
from machine import cpu_description, gemm_rate, load, peak_rss_mb  # noqa: E402
from report import markers, write_part  # noqa: E402

from rmt_deploy.runtime import open_model  # noqa: E402
from rmt_deploy.runtime.generation import GenerationOptions  # noqa: E402
from rmt_deploy.runtime.loop import last_tokens, never, run_segments  # noqa: E402
from rmt_deploy.runtime.stepper import Stepper  # noqa: E402
from rmt_deploy.runtime.tokens import ArraySource  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
M, SEGMENT, SEGMENTS, NEW_TOKENS = 16, 256, 4, 16
VOCAB, EOS = 50257, 50256
AUTHORS, BASELINE = "authors", "plain PyTorch"  # the reference; the baseline of the ratios


def word(index: int) -> str:
    return f"w{index}"


def base_folder(folder: Path, layers: int, hidden: int) -> Path:
    """config.json of a GPT-2 shape and a word-level tokenizer of its 50,257 ids."""
    folder.mkdir(parents=True, exist_ok=True)
    transformers.GPT2Config(n_layer=layers, n_embd=hidden, n_head=hidden // 64,
                            vocab_size=VOCAB, n_positions=1024, bos_token_id=EOS,
                            eos_token_id=EOS).save_pretrained(folder)
    vocab = {word(i): i for i in range(VOCAB - 1)} | {"<|endoftext|>": EOS}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    return folder


def authors_checkpoint(folder: Path, base: Path, seed: int = 0) -> tuple[Path, object, object]:
    """pytorch_model.bin in the BABILong layout (memory_cell.*), random weights."""
    torch.manual_seed(seed)
    config = transformers.AutoConfig.from_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_config(config)  # default attention, as
    # the authors' from_pretrained gets it (SDPA)
    model.eval()
    std = model.get_input_embeddings().weight.detach().std()
    memory = torch.randn(M, config.n_embd) * std
    state = {"memory_cell.memory": memory}
    state.update({f"memory_cell.model.{k}": v for k, v in model.state_dict().items()})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pytorch_model.bin"
    torch.save(state, path)
    return path, model, memory


def export(checkpoint: Path, base: Path, out: Path) -> float:
    started = time.perf_counter()
    subprocess.run([str(BIN / "rmt-export"), str(checkpoint), "--base-model", str(base),
                    "--segment-size", str(SEGMENT), "--validation-segments", "2", "-o",
                    str(out), "-q"], check=True)
    return time.perf_counter() - started


def weights_bytes(model) -> int:
    """Bytes of the model's parameters, a tied parameter counted once."""
    seen = {id(p): p for p in model.parameters()}
    return sum(p.numel() * p.element_size() for p in seen.values()) + M * model.config.n_embd * 4


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def documents(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB - 1, (batch, SEGMENTS * SEGMENT))


def ours(model, docs: np.ndarray) -> dict:
    """rmt-deploy's phases on ``docs``: the write steps, prefill + first token, the rest."""
    config = model.config
    sources = [ArraySource(doc, config) for doc in docs]
    lasts = [last_tokens(s, config) for s in sources]
    keys = list(range(len(docs)))
    with Stepper(model.engine) as stepper:
        for key in keys:
            stepper.add(key, model.initial_state)
        started = time.perf_counter()
        run_segments(stepper, sources, lambda *_: None, skip_last=True, wants_logits=never)
        read = time.perf_counter() - started
        started = time.perf_counter()
        stepper.generate(keys, lasts, GenerationOptions(1))
        first = time.perf_counter() - started
        started = time.perf_counter()
        ids = stepper.generate(keys, lasts, GenerationOptions(NEW_TOKENS))
        generation = time.perf_counter() - started
    return {"read": read, "prefill": first, "per_token": (generation - first) / (NEW_TOKENS - 1),
            "total": read + generation, "ids": ids}


def torch_side(decoder: AuthorsDecoder, docs: np.ndarray) -> dict:
    """One PyTorch side's phases on ``docs`` (the authors' or the plain one)."""
    ids = torch.from_numpy(docs)
    started = time.perf_counter()
    memory = decoder.read(ids)
    read = time.perf_counter() - started
    started = time.perf_counter()
    decoder.generate(ids, memory, 1)
    first = time.perf_counter() - started
    started = time.perf_counter()
    tokens = decoder.generate(ids, memory, NEW_TOKENS)
    generation = time.perf_counter() - started
    return {"read": read, "prefill": first, "per_token": (generation - first) / (NEW_TOKENS - 1),
            "total": read + generation, "ids": [_until_eos(row) for row in tokens.tolist()]}


def _until_eos(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def compare(model, decoders: dict[str, AuthorsDecoder], batch: int, repeats: int) -> dict:
    """rmt-deploy and each PyTorch side (the authors' first) in turn on the same
    documents; medians of each phase, every side's ids against the authors'. Stops the
    benchmark if the plain baseline's ids differ from the authors'."""
    rows = {"rmt-deploy": [], **{side: [] for side in decoders}}
    equal = {side: True for side in rows}
    for repeat in range(repeats + 1):  # the first round warms every side up
        docs = documents(batch, repeat)
        runs = {"rmt-deploy": ours(model, docs)}
        runs.update({side: torch_side(decoder, docs) for side, decoder in decoders.items()})
        for side, run in runs.items():
            equal[side] &= run["ids"] == runs[AUTHORS]["ids"]
            if repeat:
                rows[side].append(run)
    if not equal[BASELINE]:
        raise SystemExit("the plain PyTorch decoder's ids differ from the authors': the "
                         "baseline must compute the authors' outputs")
    result = {"batch": batch, "ids_equal": equal, "repeats": repeats}
    for side, runs in rows.items():
        result[side] = {phase: round(statistics.median(r[phase] for r in runs), 4)
                        for phase in ("read", "prefill", "per_token", "total")}
    for side in rows:
        result[side]["speedup_total"] = round(result[BASELINE]["total"]
                                              / result[side]["total"], 2)
        result[side]["speedup_per_token"] = round(result[BASELINE]["per_token"]
                                                  / result[side]["per_token"], 2)
    return result


def peak_rss(export_folder: Path, work: Path) -> float:
    """Peak RSS (MB) of ``rmt-run EXPORT doc.txt --generate 16`` on a 4-segment text."""
    text = work / "doc.txt"
    text.write_text(" ".join(word(int(i)) for i in documents(1, 99)[0]) + "\n")
    return peak_rss_mb([str(BIN / "rmt-run"), str(export_folder), str(text), "--generate",
                        str(NEW_TOKENS), "--backend", "onnxruntime", "--json"])


def large(work: Path) -> dict:
    """A 2.15 GB GPT-2 (24 layers of 1,280) exported: one weights file, hashed."""
    base = base_folder(work / "large-base", 24, 1280)
    checkpoint, model, _ = authors_checkpoint(work / "large-ckpt", base)
    size = weights_bytes(model)
    del model
    seconds = export(checkpoint, base, work / "large-export")
    manifest = json.loads((work / "large-export" / "rmt.json").read_text())
    files = sorted(p.name for p in (work / "large-export").iterdir())
    return {"weights_mb": round(size / 1e6), "export_mb": round(folder_bytes(
        work / "large-export") / 1e6), "files": files, "export_seconds": round(seconds),
        "weights_file": manifest["weights"]["file"],
        "hashed": all(g["data"] and g["data"][0]["sha256"] for g in manifest["graphs"].values())}


def markdown(report: dict) -> str:
    """The decoder part of docs/benchmarks.md."""
    begin, end = markers("decoder")
    cpu, model = report["cpu"], report["model"]
    lines = [begin, "", "## Decoders", "",
             f"Measured {report['date']} with one run of `python benchmarks/decoder_benchmark.py"
             f"`: {cpu['model']}, {cpu['cpus']} CPUs, "
             f"flags {', '.join(cpu['flags'])}; torch FP32 GEMM {report['gemm_gflops']['1']:.0f}"
             f" GFLOP/s on 1 thread, {report['gemm_gflops']['2']:.0f} on 2; load average "
             f"{report['load_before']} at the start, {report['load_after']} at the end.", "",
             f"A GPT-2-small-shaped RMT ({model['layers']} layers, hidden {model['hidden']}, "
             f"vocabulary {model['vocab']:,}, {model['memory']} memory tokens, segment "
             f"{model['segment']}, random weights) in the authors' `pytorch_model.bin` layout. "
             f"The job: read {model['segments_read']} segments, then answer with "
             f"{model['new_tokens']} greedy tokens. rmt-deploy runs the exported graphs on ONNX "
             "Runtime (the write graph for the segments before the last, then the KV-cache "
             "prefill and decode graphs). `benchmarks/authors_decoder.py` holds the two "
             "PyTorch sides, both with the model's default "
             f"{report['authors_attention']} attention on 2 threads: the authors' inference "
             "as their code runs it (every segment but the last through the Hugging Face "
             "model with its LM head, then `generate` with its KV cache from `[memory ; last "
             "segment]`), and the plain PyTorch loop, the baseline of the ratios: the same "
             "memory and ids, with the segments read through the transformer alone (no LM "
             "head) and a greedy loop over the KV cache instead of `generate`. All three in "
             f"one process, in turns, medians of {report['runs'][0]['repeats']} rounds after "
             "a warm-up; seconds.", "",
             "| batch | side | read | prefill + first token | per token | total | vs the "
             "plain PyTorch loop (total / per token) | ids equal to the authors' |",
             "|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        for side in (AUTHORS, BASELINE, "rmt-deploy"):
            row = run[side]
            ratio = f"{row['speedup_total']:.2f}x / {row['speedup_per_token']:.2f}x"
            equal = "" if side == AUTHORS else "yes" if run["ids_equal"][side] else "NO"
            lines.append(f"| {run['batch']} | {side} | {row['read']:.2f} | {row['prefill']:.2f} "
                         f"| {row['per_token']:.3f} | {row['total']:.2f} | {ratio} | {equal} |")
    lines += ["", "| | MB | vs the weights |", "|---|---|---|",
              f"| weights (tied head once, memory) | {report['weights_mb']:.1f} | 1x |",
              f"| export folder on disk | {report['export_mb']:.1f} | "
              f"{report['export_vs_weights']:.3f}x |",
              f"| peak RSS of `rmt-run EXPORT doc.txt --generate {model['new_tokens']}` | "
              f"{report['peak_rss_mb']:.1f} | {report['rss_vs_weights']:.3f}x |"]
    if "large" in report:
        large_run = report["large"]
        lines += ["", f"Past 2 GB (`--large`, run {large_run['date']}): a GPT-2 of 24 layers "
                  f"of 1,280 ({large_run['weights_mb']:,} MB of weights) exports in "
                  f"{large_run['export_seconds']} s to {large_run['export_mb']:,} MB: "
                  f"{', '.join(large_run['files'])}; every "
                  f"graph references the one weights file `{large_run['weights_file']}`, "
                  f"{'hashed' if large_run['hashed'] else 'NOT hashed'} in the manifest."]
    lines += ["", end]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12, help="of the benchmarked model")
    parser.add_argument("--hidden", type=int, default=768, help="of the benchmarked model")
    parser.add_argument("--large", action="store_true", help="also export a 2.15 GB model")
    parser.add_argument("--work", type=Path, help="keep the checkpoint and its export here "
                        "and reuse them [default: a temporary folder]")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "decoder-benchmark.json")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "benchmarks.md",
                        help="whose decoder part is rewritten")
    parser.add_argument("--armt", action="store_true", help="run the ARMT part instead "
                        "(armt_benchmark.py): docs/armt-benchmark.json, its part of the page")
    parser.add_argument("--threads", type=int, default=2,
                        help="of torch (the decoder part)")
    parser.add_argument("--armt-threads", type=int, nargs="+", default=[1, 2],
                        help="the ARMT part: each count in turn, of both sides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.armt:
        armt = armt_part(args.repeats, args.work, args.armt_threads)
        (ROOT / "docs" / "armt-benchmark.json").write_text(json.dumps(armt, indent=2) + "\n")
        write_part(args.page, "armt", armt_markdown(armt))
        print(json.dumps(armt, indent=2))
        return
    with tempfile.TemporaryDirectory(prefix="rmt-decoder-bench-") as tmp:
        work = args.work or Path(tmp)
        shape = f"{args.layers}x{args.hidden}"
        base = base_folder(work / f"base-{shape}", args.layers, args.hidden)
        checkpoint, model, memory = authors_checkpoint(work / f"ckpt-{shape}", base)
        folder = work / f"export-{shape}"
        reused = (folder / "rmt.json").is_file()
        export_seconds = None if reused else export(checkpoint, base, folder)
        exported = open_model(folder, backend="onnxruntime")
        decoders = {AUTHORS: AuthorsDecoder(model, memory, SEGMENT),
                    BASELINE: PlainDecoder(model, memory, SEGMENT)}
        report = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "python": platform.python_version(),
            "torch": torch.__version__, "cpu": cpu_description(), "load_before": load(),
            "gemm_gflops": {"1": round(gemm_rate(1), 1), "2": round(gemm_rate(2), 1)},
            "model": {"layers": args.layers, "hidden": args.hidden, "vocab": VOCAB, "memory": M,
                      "segment": SEGMENT, "segments_read": SEGMENTS,
                      "new_tokens": NEW_TOKENS},
            "authors_attention": model.config._attn_implementation,
            "weights_mb": round(weights_bytes(model) / 1e6, 1),
            "export_mb": round(folder_bytes(folder) / 1e6, 1),
            "export_seconds": None if export_seconds is None else round(export_seconds),
            "runs": [compare(exported, decoders, batch, args.repeats) for batch in (1, 4)],
            "peak_rss_mb": round(peak_rss(folder, work), 1),
        }
        report["export_vs_weights"] = round(report["export_mb"] / report["weights_mb"], 3)
        report["rss_vs_weights"] = round(report["peak_rss_mb"] / report["weights_mb"], 3)
        report["load_after"] = load()
        earlier = json.loads(args.out.read_text()) if args.out.exists() else {}
        save(report, args)
        if args.large:
            del exported, decoders, model
            report["large"] = {**large(work), "date": report["date"]}
            save(report, args)
        elif "large" in earlier:
            report["large"] = {"date": earlier["date"], **earlier["large"]}  # kept, not re-run
            save(report, args)
    print(json.dumps(report, indent=2))


def save(report: dict, args: argparse.Namespace) -> None:
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    write_part(args.page, "decoder", markdown(report))


if __name__ == "__main__":
    main()
