"""``rmt-export``: checkpoint -> ONNX step graph(s) -> validated -> manifest."""

from __future__ import annotations

import contextlib
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from rmt_deploy import __version__
from rmt_deploy.calibration.data import CalibrationCorpus, read_corpus
from rmt_deploy.calibration.policies import policy_named
from rmt_deploy.calibration.quantize import METHODS
from rmt_deploy.contract import PREFILL, state_pairs, variants
from rmt_deploy.errors import ConfigError
from rmt_deploy.export.comparator import compare
from rmt_deploy.export.folder import check_target
from rmt_deploy.export.int8 import QUANTIZED, Int8Options, add_int8
from rmt_deploy.export.onnx_graph import DEFAULT_OPSET, EXPORTER, export_graph
from rmt_deploy.export.precision import fp16_graph
from rmt_deploy.export.validate import (
    Tolerance,
    check_onnx,
    enforce,
    enforce_agreement,
    enforce_states,
)
from rmt_deploy.export.validate_generation import compare_generation, enforce_generation
from rmt_deploy.export.weights import WeightStore
from rmt_deploy.files import atomic_folder, sha256_file
from rmt_deploy.manifest import (
    PRECISIONS,
    Manifest,
    graph_key,
    graph_spec,
    initial_state_records,
    read_manifest,
    write_manifest,
)
from rmt_deploy.model.base import ATTENTION
from rmt_deploy.model.checkpoint import AuthorsOptions, LoadedCheckpoint, load_checkpoint
from rmt_deploy.runtime.options import RuntimeOptions, idle_cpus
from rmt_deploy.runtime.tokens import plain_tokenizer

#: ``progress(phase, steps_done, steps_total)``: how far a long phase of the export is.
PhaseProgress = Callable[[str, int, int], None]


def _phase(options: ExportOptions, phase: str) -> Callable[[int, int], None] | None:
    if options.progress is None:
        return None
    return lambda done, total: options.progress(phase, done, total)


def _estimating(progress: Callable[[int, int], None] | None, log: Callable[[str], None],
                what: str, after: int = 4) -> Callable[[int, int], None]:
    """``progress`` that also logs, once ``after`` steps are done, how long the whole run
    will take at their pace (CPU FP16 runs are long: --drift-segments sets their length)."""
    started = time.perf_counter()

    def step(done: int, total: int) -> None:
        if done == after < total:
            minutes = (time.perf_counter() - started) / done * (total - done) / 60
            log(f"{what}: {total} paired steps, about {minutes:.1f} more minutes at the pace "
                "of the first (--drift-segments sets the run's length)")
        if progress is not None:
            progress(done, total)

    return step


@dataclass(frozen=True)
class ExportOptions:
    """How to export and how strictly to validate."""

    authors: AuthorsOptions = field(default_factory=AuthorsOptions)
    tolerance: Tolerance = field(default_factory=Tolerance)
    opset: int = DEFAULT_OPSET
    validation_segments: int = 32  # closed loop runs at least this many segments
    threads: int | None = None
    precision: str = "fp32"  # "fp16" / "int8" add such graphs beside the FP32 ones
    drift_segments: int = 1000  # closed-loop run that judges a reduced-precision graph
    min_agreement: float = 0.99  # closed-loop argmax agreement with FP32 required of it
    calibration: Path | None = None  # INT8: calibration documents (file or folder)
    int8_policy: str = "auto"  # INT8: a policy name, or the most quantized that passes
    calibration_steps: int = 256  # INT8: recorded steps kept for calibration
    calibration_method: str = "minmax"  # INT8: activation ranges, "minmax" or "percentile"
    progress: PhaseProgress | None = None  # told the steps of each long validation run


def default_output(checkpoint: Path) -> Path:
    """The folder beside the checkpoint, named after it."""
    return checkpoint.with_name(checkpoint.stem + "-export")


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path | None = None,
    options: ExportOptions | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> Manifest:
    """Export, validate and write an export folder; returns its manifest."""
    checkpoint = Path(checkpoint)
    options = options or ExportOptions()
    out = Path(out) if out is not None else default_output(checkpoint)
    sources = (checkpoint, options.authors.base_model, options.calibration)
    check_target(out, sources)  # before the (slow) load: a refused target fails fast, silently
    _check_precision(options)
    options = replace(options, threads=options.threads or idle_cpus())
    import torch

    torch.set_num_threads(options.threads)  # the ONNX export and the reference alike
    loaded = load_checkpoint(checkpoint, options.authors)
    log(f"loaded {checkpoint} ({loaded.format}, {loaded.rmt.rmt_config.variant}, "
        f"M={loaded.rmt.rmt_config.num_mem_tokens})")
    with _calibration_corpus(loaded, options) as corpus, \
            atomic_folder(out, check=lambda: check_target(out, sources)) as stage:
        _write_export(loaded, checkpoint, stage, options, corpus, log)
    return read_manifest(out)


def _calibration_corpus(loaded: LoadedCheckpoint,
                        options: ExportOptions) -> contextlib.AbstractContextManager:
    """INT8: the calibration documents, read and checked before the FP32 export starts,
    so that bad ones fail fast; otherwise nothing."""
    if options.precision != "int8":
        return contextlib.nullcontext()
    tokenizer = (plain_tokenizer(Tokenizer.from_str(loaded.tokenizer_json))
                 if loaded.tokenizer_json else None)
    return read_corpus(options.calibration, loaded.rmt.rmt_config, tokenizer)


def _write_export(loaded: LoadedCheckpoint, checkpoint: Path, stage: Path,
                  options: ExportOptions, corpus: CalibrationCorpus | None,
                  log: Callable[[str], None]) -> None:
    import onnx
    import torch

    from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine
    from rmt_deploy.runtime.backends.torch import TorchEngine

    rmt, config = loaded.rmt, loaded.rmt.rmt_config
    graphs = {}
    contracts = variants(config)
    store = WeightStore(stage)
    for name, contract in contracts.items():
        path = stage / contract.file
        with _scratch(stage) as folder:
            scratch = Path(folder)  # the exporter's own external data files land here
            export_graph(rmt, scratch / contract.file, name, options.opset)
            store.add_graph(scratch / contract.file, path)
        check_onnx(path)
        graphs[name] = graph_spec(config, name, path, data=store.reference)
        log(f"wrote {path.name} ({path.stat().st_size / 1e6:.1f} MB graph, weights in "
            f"{store.path.name}), ONNX checks passed")

    reference = TorchEngine(rmt, threads=options.threads)
    initial_state = reference.initial_state()
    tokenizer = None
    if loaded.tokenizer_json:
        (stage / "tokenizer.json").write_text(
            plain_tokenizer(Tokenizer.from_str(loaded.tokenizer_json)).to_str())
        tokenizer = {"file": "tokenizer.json", "sha256": sha256_file(stage / "tokenizer.json")}
    manifest = Manifest(
        config=config,
        graphs=graphs,
        initial_state=initial_state_records(config, initial_state, stage),
        tokenizer=tokenizer,
        source={"checkpoint": checkpoint.name, "sha256": loaded.sha256, "format": loaded.format,
                **({"lora": loaded.lora.to_dict()} if loaded.lora else {})},
        exporter={
            "rmt_deploy": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "exporter": EXPORTER, "opset": options.opset, "attention": ATTENTION,
            "python": platform.python_version(),
        },
        folder=stage,
    )
    # mapped once for every graph's session, as rmt-run opens the export
    candidate = OnnxRuntimeEngine(replace(manifest, weights=store.index()),
                                  RuntimeOptions(threads=options.threads))
    comparison = compare(reference, candidate, initial_state, options.validation_segments,
                         progress=_phase(options, "validating against PyTorch"))
    for loop in comparison.loops:
        log(f"{loop.mode.replace('_', ' ')} vs PyTorch: {loop.summary()}")
    enforce(comparison, options.tolerance)
    if config.is_armt:
        enforce_states(comparison, "fp32", "validation", "PyTorch")
    results = comparison.to_dict()
    results["runtime"] = "onnxruntime " + _ort_version()
    results["tolerance"] = {"open_loop": options.tolerance.open_loop,
                            "closed_loop": options.tolerance.closed_loop}
    if PREFILL in candidate.graphs:
        results["generation"] = compare_generation(reference, candidate, initial_state)
        _log_generation(results["generation"], "vs PyTorch", log)
        enforce_generation(results["generation"], "the export", "the reference",
                           options.tolerance.open_loop,
                           advice="; the exported graphs do not reproduce the reference "
                                  "(loosen explicitly with --atol)")
    manifest.validation = {"fp32": results}
    if options.precision == "fp16":
        _add_fp16(manifest, candidate, list(contracts), stage, store, options, log)
    elif options.precision == "int8":
        add_int8(manifest, candidate, {name: contracts[name].file for name in
                                       QUANTIZED}, stage, store,
                 Int8Options(policy=options.int8_policy, max_steps=options.calibration_steps,
                             min_agreement=options.min_agreement,
                             drift_segments=options.drift_segments,
                             method=options.calibration_method, threads=options.threads,
                             progress=options.progress),
                 corpus, log)
    _seal_weights(manifest, store)
    log(f"wrote {store.path.name} ({store.path.stat().st_size / 1e6:.1f} MB, "
        f"{len(store.tensors)} tensors shared by {len(manifest.graphs)} graphs)")
    write_manifest(manifest, stage)


def _scratch(stage: Path) -> tempfile.TemporaryDirectory:
    """A folder inside the staging folder, removed after use."""
    return tempfile.TemporaryDirectory(prefix=".scratch-", dir=stage, ignore_cleanup_errors=True)


def _seal_weights(manifest: Manifest, store: WeightStore) -> None:
    """The finished weights file, hashed, in every graph's entry and in the manifest's
    weights index."""
    record = store.record()
    entry = {"file": record["file"], "sha256": record["sha256"]}
    manifest.graphs = {key: replace(spec, data=(entry,)) if spec.data else spec
                       for key, spec in manifest.graphs.items()}
    manifest.weights = {"file": record["file"], "tensors": record["tensors"]}


def _check_precision(options: ExportOptions) -> None:
    RuntimeOptions(threads=options.threads)  # within the host's CPUs, before any work
    if options.precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {options.precision!r}; use one of "
                          f"{', '.join(PRECISIONS)}")
    if options.precision == "int8":
        if options.calibration is None:
            raise ConfigError("--precision int8 needs calibration documents: add "
                              "--calibration FILE_OR_FOLDER (text like the model's input)")
        if not Path(options.calibration).exists():
            raise ConfigError(f"{options.calibration}: no such calibration file or folder")
        if options.int8_policy != "auto":
            policy_named(options.int8_policy)
        if options.calibration_method not in METHODS:
            raise ConfigError(f"unknown calibration method {options.calibration_method!r}; "
                              f"use one of {', '.join(METHODS)}")
    elif options.calibration is not None:
        raise ConfigError("--calibration is only used with --precision int8")


def _add_fp16(manifest: Manifest, fp32: Any, names: list[str], stage: Path,
              store: WeightStore, options: ExportOptions, log: Callable[[str], None]) -> None:
    """Write, check and judge the FP16 graphs against the validated FP32 ones."""
    from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine
    from rmt_deploy.runtime.options import RuntimeOptions

    config = manifest.config
    for name in names:
        source = stage / manifest.graphs[name].file
        target = source.with_suffix(".fp16.onnx")
        with _scratch(stage) as folder:
            scratch = Path(folder)
            fp16_graph(source, scratch / target.name,
                       [pair.name_out for pair in state_pairs(config)])
            store.add_graph(scratch / target.name, target)
        check_onnx(target)
        manifest.graphs[graph_key(name, "fp16")] = graph_spec(config, name, target, "fp16",
                                                             data=store.reference)
        log(f"wrote {target.name} ({target.stat().st_size / 1e6:.1f} MB), ONNX checks passed")
    candidate = OnnxRuntimeEngine(replace(manifest, weights=store.index()),
                                  RuntimeOptions(threads=options.threads, precision="fp16"))
    comparison = compare(fp32, candidate, manifest.load_initial_state(),
                         options.drift_segments, modes=("closed_loop",),
                         progress=_estimating(_phase(options, "judging fp16 closed loop"), log,
                                              "fp16 closed loop"))
    log(f"fp16 closed loop vs fp32 over {options.drift_segments} segments: "
        + comparison.closed_loop.summary())
    enforce_agreement(comparison, options.min_agreement, "the FP16 graph")
    if config.is_armt:
        enforce_states(comparison, "fp16", "the FP16 graph", "FP32")
    results = comparison.to_dict()
    results["reference"] = "fp32 graph on onnxruntime"
    if PREFILL in candidate.graphs:
        results["generation"] = compare_generation(fp32, candidate,
                                                   manifest.load_initial_state())
        _log_generation(results["generation"], "fp16 vs fp32", log)
        enforce_generation(results["generation"], "the FP16 graphs", "FP32", None,
                           options.min_agreement, "; export FP32 only")
    manifest.validation["fp16"] = results


def _log_generation(results: dict[str, Any], what: str, log: Callable[[str], None]) -> None:
    errors = ", ".join(f"{k} {v:.2e}" for k, v in results["max_abs"].items())
    log(f"generation {what}: {results['generated_same']:.0%} of {results['rows']} rows "
        f"generate the same {results['new_tokens']} tokens; max abs error {errors}")


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
