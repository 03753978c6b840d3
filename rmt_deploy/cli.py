"""Command-line entry points: parse, call one library function, print. Errors caused by
input are one line on stderr and a non-zero exit, never a traceback.

Exit status: 0 done; 1 an error (one line on stderr says what to fix); 2 a usage error;
70 an internal error, a bug (``RMT_DEBUG=1`` shows its traceback); 130 interrupted
(Ctrl-C); 143 terminated (SIGTERM). An interrupted command removes what it had half
written."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import BinaryIO, NoReturn

import click

from rmt_deploy.calibration.policies import POLICY_NAMES
from rmt_deploy.errors import RmtError
from rmt_deploy.parameters import COSINE, SEED, SHARE, TOLERANCE, sampling_options
from rmt_deploy.spec import PAPER_LABELS

EX_SOFTWARE = 70  # sysexits.h: an internal error
EXIT_STATUS = ("Exit status: 0 done, 1 error (one line on stderr), 2 usage error, 70 "
               "internal error (a bug; RMT_DEBUG=1 shows the traceback), 130 interrupted, "
               "143 terminated.")
SETTINGS = {"help_option_names": ["-h", "--help"]}


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every cleanup runs on the way out."""


def _terminate(_signum, _frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut a cleanup
    raise Terminated


def _user_errors(name: str, doing: str, prints: bool = True):
    """Map RmtError, interrupts and host errors to a one-line message and an exit code;
    anything else is a bug, reported in one line naming ``doing`` (what the command
    does) with exit status 70. ``prints``: the command writes its result on stdout, which
    must be usable."""

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            previous = signal.signal(signal.SIGTERM, _terminate)
            try:
                if prints:
                    _require_stdout()
                return command(*args, **kwargs)
            except RmtError as error:
                _fail(name, f"error: {error}", 1)
            except KeyboardInterrupt:
                _fail(name, "interrupted", 130)
            except Terminated:
                _fail(name, "terminated", 143)
            except OSError as error:  # permission denied, disk full, ...: the host's state
                where = f"{error.filename}: " if error.filename else ""
                _fail(name, f"error: {where}{error.strerror or error}; check the path and "
                      "its permissions and free space", 1)
            except (click.ClickException, click.exceptions.Exit, click.Abort):
                raise
            except Exception as error:
                if os.environ.get("RMT_DEBUG", "") not in ("", "0"):
                    raise
                _fail(name, f"internal error while {doing}: {type(error).__name__}: "
                      f"{_one_line(error)} (a bug; run again with RMT_DEBUG=1 to see the "
                      "traceback)", EX_SOFTWARE)
            finally:
                signal.signal(signal.SIGTERM, previous)

        return wrapper

    return decorate


def _fail(name: str, message: str, code: int) -> NoReturn:
    click.echo(f"{name}: {message}", err=True)
    sys.exit(code)


def _one_line(error: Exception, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _usable(stream, modes: tuple[int, ...]) -> bool:
    """Whether a standard stream is open on a descriptor opened for one of ``modes``."""
    if stream is None:  # the descriptor was closed when Python started
        return False
    try:
        return (fcntl.fcntl(stream.fileno(), fcntl.F_GETFL) & os.O_ACCMODE) in modes
    except io.UnsupportedOperation:  # an in-memory stream (click's test runner)
        return True
    except (OSError, ValueError):
        return False


def _require_stdout() -> None:
    if not _usable(sys.stdout, (os.O_WRONLY, os.O_RDWR)):
        raise RmtError("stdout is closed or not writable, so the result would be lost; run "
                       "again with stdout open (redirect it to a file to keep the result)")


def stdin_stream() -> BinaryIO:
    """stdin as bytes, for INPUT '-'; a closed stdin is a one-line error."""
    if not _usable(sys.stdin, (os.O_RDONLY, os.O_RDWR)):
        raise RmtError("stdin is closed or not readable; pipe the text in, or give INPUT as "
                       "a file")
    return sys.stdin.buffer


def echo(message: str) -> None:
    """Print a line of the result on stdout; a stdout that fails (a closed pipe) is a
    one-line error, not a lost result."""
    try:
        click.echo(message)
        sys.stdout.flush()
    except OSError as error:
        _silence_stdout()
        raise RmtError(f"cannot write the result to stdout ({error.strerror or error}); run "
                       "again with stdout open") from None


def _silence_stdout() -> None:
    """Point the broken stdout at /dev/null: Python's flush at exit would fail again."""
    with contextlib.suppress(OSError, ValueError):  # ValueError: no descriptor (tests)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _labels(_ctx, _param, value: str | None) -> tuple[str, ...]:
    if value is None:
        return PAPER_LABELS
    labels = tuple(label.strip() for label in value.split(","))
    if not all(labels) or len(set(labels)) != len(labels):
        raise click.BadParameter("give distinct, non-empty names separated by commas")
    return labels


def _positive(_ctx, _param, value):
    if value is not None and value <= 0:
        raise click.BadParameter("must be positive")
    return value


def _authors_checkpoint_options(command):
    """The options that read an authors' checkpoint: --base-model, --input-size,
    --segment-size, --labels, --lora-alpha, --armt-correction, --sliding-window."""
    options = [
        click.option("--base-model", type=click.Path(path_type=Path),
                     help="Hugging Face folder of the base model (authors' checkpoints "
                          "only)."),
        click.option("--input-size", type=int, default=512, show_default=True,
                     callback=_positive,
                     help="Positions per segment of an authors' BERT checkpoint."),
        click.option("--segment-size", type=int, callback=_positive,
                     help="Tokens per segment of an authors' decoder checkpoint [default: "
                          "the segment_size of the config.json beside it, else 512]."),
        click.option("--labels", callback=_labels, metavar="A,B,C",
                     help="Class names of an authors' BERT checkpoint, in logit order "
                          "[default: the paper's six rooms]."),
        click.option("--lora-alpha", type=click.FloatRange(min=0, min_open=True),
                     help="lora_alpha of a checkpoint holding peft LoRA weights (required "
                          "then): the LoRA is merged as W + alpha/r B A."),
        click.option("--armt-correction/--no-armt-correction", default=True,
                     show_default=True, help="ARMT checkpoints: the memory update's "
                     "correction (the authors' class default is on)."),
        click.option("--sliding-window", is_flag=True,
                     help="ARMT checkpoints: each segment also attends to the previous one."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command(context_settings=SETTINGS, epilog=EXIT_STATUS)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Export folder [default: CHECKPOINT-export beside the checkpoint].")
@_authors_checkpoint_options
@click.option("--atol", type=TOLERANCE, default=1e-4, show_default=True,
              help="Largest open-loop error allowed (one step from the same memory).")
@click.option("--closed-loop-atol", type=TOLERANCE, default=1e-3, show_default=True,
              help="Largest closed-loop error allowed.")
@click.option("--validation-segments", type=click.IntRange(min=2), default=32,
              show_default=True, help="Segments of the closed-loop validation run.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32",
              show_default=True, help="fp16 adds mixed-precision FP16 graphs (for TensorRT), "
              "int8 calibrated Q/DQ INT8 graphs; both judged closed loop against FP32.")
@click.option("--drift-segments", type=click.IntRange(min=2), default=1000, show_default=True,
              help="Segments of the closed-loop run that judges an FP16 or INT8 graph.")
@click.option("--calibration", type=click.Path(path_type=Path), metavar="PATH",
              help="INT8: calibration documents (a text file, a folder of .txt files, or "
                   ".npy/.npz token ids); every 4th document is held out to judge.")
@click.option("--int8-policy", type=click.Choice(["auto", *POLICY_NAMES]), default="auto",
              show_default=True, help="INT8: what to quantize; auto keeps the fastest policy "
              "whose closed-loop predictions agree with FP32.")
@click.option("--calibration-steps", type=click.IntRange(min=8), default=256,
              show_default=True, help="INT8: recorded steps used to calibrate.")
@click.option("--calibration-method", type=click.Choice(["minmax", "percentile"]),
              default="minmax", show_default=True, help="INT8: activation ranges from the "
              "calibration steps' extremes, or their 99.999th percentile (clips outliers).")
@click.option("--min-agreement", type=SHARE, default=0.99, show_default=True,
              help="Share of closed-loop predictions an FP16/INT8 graph must share with FP32.")
@click.option("--convert", type=click.Path(path_type=Path), metavar="OUT.pt",
              help="Only convert the checkpoint to rmt-deploy's own format and stop.")
@click.option("--overwrite", is_flag=True, help="--convert: replace OUT.pt if it exists.")
@click.option("--engine", is_flag=True,
              help="Also build TensorRT plans (needs TensorRT and an NVIDIA GPU).")
@click.option("--batch", "batch_profile", default="1,1,8", show_default=True,
              metavar="MIN,OPT,MAX", help="Batch sizes of the TensorRT profile.")
@click.option("--workspace-mb", type=int, default=4096, show_default=True,
              callback=_positive, help="TensorRT builder workspace limit.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="TensorRT, decoders: tokens the decode plan's profile leaves room for.")
@click.option("--timing-cache", type=click.Path(path_type=Path),
              help="TensorRT timing cache file, reused and updated across builds.")
@click.option("--threads", type=int, callback=_positive, help="CPU threads of torch and "
              "ONNX Runtime "
              "[default: the CPUs not kept busy by other processes, by the 1-minute load, "
              "at least 1].")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
@_user_errors("rmt-export", "exporting the checkpoint", prints=False)
def export_main(checkpoint, output, base_model, input_size, segment_size, labels, lora_alpha,
                armt_correction, sliding_window, atol,
                closed_loop_atol, validation_segments, precision, drift_segments,
                calibration, int8_policy, calibration_steps, calibration_method,
                min_agreement, convert, overwrite, engine,
                batch_profile, workspace_mb, max_new_tokens, timing_cache, threads, quiet):
    """Export CHECKPOINT's segment step to a validated ONNX graph and a manifest.

    CHECKPOINT is an rmt-deploy checkpoint (.pt/.safetensors), or an authors' checkpoint
    (BERT model_best.pth, GPT-2 pytorch_model.bin, or a published Llama RMT / ARMT
    model.safetensors) with --base-model. An existing -o
    folder is replaced only if it is an export holding nothing else.
    """
    from rmt_deploy.export.folder import check_file_target, check_target

    log = (lambda message: None) if quiet else (lambda message: click.echo(message, err=True))
    progress = None if quiet else _phase_bars(sys.stderr)
    # the targets are checked first: a refused one fails fast, before the slow imports
    if convert is not None:
        check_file_target(convert, checkpoint, base_model, overwrite)
    elif output is not None:
        check_target(output, (checkpoint, base_model, calibration))
    if timing_cache is not None:
        from rmt_deploy.outputs import check_output_file

        check_output_file(timing_cache, "--timing-cache", example="timing.cache", reused=True,
                          inputs={"the checkpoint": checkpoint},
                          folders={"the base model": base_model, "the output folder": output,
                                   "the calibration data": calibration})
    from rmt_deploy.model.checkpoint import AuthorsOptions, load_checkpoint, save_checkpoint

    authors = AuthorsOptions(base_model, input_size, segment_size, labels, lora_alpha,
                             armt_correction, sliding_window)
    if convert is not None:
        loaded = load_checkpoint(checkpoint, authors)
        save_checkpoint(loaded.rmt, convert, loaded.tokenizer_json)
        log(f"converted {checkpoint} ({loaded.format}) to {convert}")
        return
    from rmt_deploy.export.pipeline import ExportOptions, export_checkpoint
    from rmt_deploy.export.validate import Tolerance

    options = ExportOptions(authors=authors, tolerance=Tolerance(atol, closed_loop_atol),
                            validation_segments=validation_segments, threads=threads,
                            precision=precision, drift_segments=drift_segments,
                            calibration=calibration, int8_policy=int8_policy,
                            calibration_steps=calibration_steps,
                            calibration_method=calibration_method, min_agreement=min_agreement,
                            progress=progress)
    engine_options = None
    if engine:
        from rmt_deploy.contract import BatchProfile
        from rmt_deploy.export.tensorrt_build import EngineOptions

        engine_options = EngineOptions(BatchProfile.parse(batch_profile), workspace_mb,
                                       timing_cache, drift_segments=drift_segments,
                                       min_agreement=min_agreement,
                                       reference_checkpoint=checkpoint, authors=authors,
                                       threads=threads, max_new_tokens=max_new_tokens)
    manifest = export_checkpoint(checkpoint, output, options, log)
    log(f"exported to {manifest.folder}")
    if engine_options is not None:
        from rmt_deploy.errors import BackendError
        from rmt_deploy.export.tensorrt_build import build_engines

        try:
            build_engines(manifest.folder, engine_options, log)
        except BackendError as error:
            raise BackendError(f"{error}; the validated ONNX graphs are in {manifest.folder}"
                               ) from None


def _phase_bars(stream):
    """click progress bars on a terminal, one per phase of work: ``show(phase, done,
    total)``; None (nothing shown) where ``stream`` is not a terminal."""
    if not stream.isatty():
        return None
    bars = {}

    def show(phase: str, done: int, total: int) -> None:
        if phase not in bars:
            bars[phase] = click.progressbar(length=total, label=phase, file=stream,
                                            show_pos=True, show_eta=True)
        bar = bars[phase]
        bar.update(done - bar.pos)
        if done >= total:
            bar.render_finish()

    return show


def _progress_printer(stream):
    """rmt-run's progress bar of segments on a terminal; nothing otherwise."""
    bars = _phase_bars(stream)
    return None if bars is None else functools.partial(bars, "segments")


def _measure_option(command):
    """--measure: measure the backend choice again rather than read it from the cache."""
    return click.option(
        "--measure", is_flag=True,
        help="Measure the backend choice again (it is cached per model and host in "
             "$XDG_CACHE_HOME/rmt-deploy, else ~/.cache/rmt-deploy, and re-measured by "
             "itself when runs contradict it); not with --backend.")(command)


@click.command(context_settings=SETTINGS, epilog=EXIT_STATUS)
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("input", type=str)
@click.option("--backend", type=click.Choice(["onnxruntime", "openvino", "tensorrt", "torch"]),
              help="Backend [default: TensorRT where MODEL has plans, else the CPU backend "
                   "and settings measured fastest for MODEL on this host, cached].")
@_measure_option
@click.option("--cuda-graphs", is_flag=True, help="TensorRT: replay captured CUDA graphs.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32",
              show_default=True, help="Which of the export's graphs to run (ONNX backends).")
@click.option("--generate", type=click.IntRange(min=0), default=0,
              help="Decoders: generate up to N tokens after the input (stops at EOS), "
                   "greedily unless --temperature is given; no perplexity is computed then.")
@sampling_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--threads", type=int, callback=_positive, help="CPU threads.")
@click.option("--state-file", type=click.Path(path_type=Path),
              help="Save the run's state to this file as it goes (removed when it completes); "
                   "an existing file must be a state rmt-run saved.")
@click.option("--state-every", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Segments between two saves of --state-file.")
@click.option("--resume", type=click.Path(path_type=Path),
              help="Continue a run from the state it saved (same MODEL and INPUT); it goes "
                   "on saving there (or to --state-file) and is removed when the run completes.")
@_user_errors("rmt-run", "running the model")
def run_main(model, input, backend, measure, cuda_graphs, precision, generate, temperature,
             top_k, top_p, seed, as_json, threads, state_file, state_every, resume):
    """Run MODEL over INPUT, a text file of any length ('-' for stdin).

    MODEL is an export folder, its model.onnx or model.plan, or a checkpoint (reference
    backend). With --state-file a run killed part-way continues with --resume.
    """
    resumable = state_file is not None or resume is not None
    sampling = temperature > 0 or top_k or top_p < 1 or seed is not None
    if sampling and not generate:
        raise RmtError("--temperature, --top-k, --top-p and --seed shape generation; add "
                       "--generate N")
    if sampling and not temperature:
        raise RmtError("--top-k, --top-p and --seed sample: give a --temperature above 0")
    if resumable and generate:
        raise RmtError("--generate cannot be combined with --state-file or --resume; run "
                       "without them to generate")
    document = stdin_stream() if input == "-" else Path(input)
    if state_file is not None:
        from rmt_deploy.runtime.resume import check_state_file

        check_state_file(state_file, document if input != "-" else None, model)
    from rmt_deploy.runtime import open_model

    rmt = open_model(model, backend=backend, threads=threads, cuda_graphs=cuda_graphs,
                     precision=precision, measure="again" if measure else "auto")
    if resumable:
        from rmt_deploy.runtime.resume import run_resumable

        run = run_resumable(rmt, document, state_file=state_file, every=state_every,
                            resume=resume, progress=_progress_printer(sys.stderr))
    else:
        from rmt_deploy.runtime.generation import GenerationOptions

        options = GenerationOptions(generate, temperature, top_k, top_p, seed) if generate \
            else 0
        run = rmt.run([document], generate=options, progress=_progress_printer(sys.stderr))
    output = run.outputs[0]
    report = {
        "backend": run.backend, "precision": run.precision, "tokens": run.tokens,
        "segments": run.segments, "seconds": round(run.seconds, 4),
        "tokens_per_second": round(run.tokens_per_second, 1),
        "resumed_tokens": run.resumed_tokens,
        "backend_choice": rmt.choice.to_dict() if rmt.choice else None,
    }
    if rmt.config.is_encoder:
        report.update(label=output.label, scores=output.scores,
                      logits=[float(x) for x in output.logits])
    elif generate:  # generation reads the last segment: no perplexity is computed
        report.update(generated=output.generated, generated_ids=output.generated_ids)
    else:
        report.update(perplexity=output.perplexity)
    if as_json:
        echo(json.dumps(report, allow_nan=False))
        return
    if rmt.config.is_encoder:
        echo(f"answer: {output.label} (p={output.scores[output.label]:.4f})")
    elif generate:
        echo(f"generated: {output.generated!r}")
    elif output.perplexity is None:
        echo("perplexity: none (a document of one token predicts nothing)")
    else:
        echo(f"perplexity: {output.perplexity:.4f}")
    resumed = f" ({run.resumed_tokens:,} from the saved state)" if run.resumed_tokens else ""
    echo(f"tokens: {run.tokens:,}{resumed}  segments: {run.segments:,}  time: "
         f"{run.seconds:.2f} s  tokens/s: {run.tokens_per_second:,.0f}  backend: {run.backend} "
         f"({run.precision})" + (f", {rmt.choice.describe()}" if rmt.choice else ""))


@click.group(context_settings=SETTINGS, epilog=EXIT_STATUS)
def demo_main():
    """The demo task: fact memorization over long noise (the RMT paper's task)."""


@demo_main.command("generate")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--tokens", type=click.IntRange(min=10), default=1_000_000, show_default=True,
              help="Tokens per sample.")
@click.option("--samples", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--mode", type=click.Choice(["memorize", "detect"]), default="memorize",
              show_default=True, help="Fact at the start, or at a random position.")
@_user_errors("rmt-demo", "generating samples")
def demo_generate(out_dir, tokens, samples, seed, mode):
    """Write sample_NNNNN.txt inputs and their answers (answers.tsv) to OUT_DIR."""
    from rmt_deploy.demo.task import write_inputs

    paths = write_inputs(out_dir, samples, tokens, seed, mode)
    echo(f"wrote {len(paths)} sample(s) of {tokens:,} tokens and answers.tsv to {out_dir}")


@demo_main.command("train")
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True, callback=_positive)
@_user_errors("rmt-demo", "training")
def demo_train(output, seed, threads):
    """Train the demo encoder RMT on CPU (segment curriculum) and save it to OUTPUT."""
    import torch

    from rmt_deploy.demo.train import TrainOptions, save_demo, train
    from rmt_deploy.runtime.options import RuntimeOptions

    RuntimeOptions(threads=threads)  # within the host's CPUs
    torch.set_num_threads(threads)
    options = TrainOptions(seed=seed)
    save_demo(train(options, log=lambda m: click.echo(m, err=True)), output, options)
    echo(f"saved {output}")


@demo_main.command("evaluate")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--segments", "segment_counts", type=click.IntRange(min=1), multiple=True,
              required=True, help="Input length in segments (repeat for several).")
@click.option("--samples", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--seed", type=SEED, default=1, show_default=True)
@click.option("--mode", type=click.Choice(["memorize", "detect"]), default="memorize",
              show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--backend", type=click.Choice(["onnxruntime", "openvino", "tensorrt", "torch"]))
@_measure_option
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32",
              show_default=True, help="Which of the export's graphs to run.")
@click.option("--threads", type=int, callback=_positive)
@_user_errors("rmt-demo", "evaluating the model")
def demo_evaluate(model, segment_counts, samples, seed, mode, batch, backend, measure,
                  precision, threads):
    """Accuracy of MODEL on fresh samples, by input length (prints JSON lines)."""
    from rmt_deploy.demo.evaluate import accuracy
    from rmt_deploy.runtime import open_model

    rmt = open_model(model, backend=backend, threads=threads, precision=precision,
                     measure="again" if measure else "auto")
    for count in segment_counts:
        started = time.perf_counter()
        value = accuracy(rmt, count, samples, seed, mode, batch)
        echo(json.dumps({
            "segments": count, "tokens": count * rmt.config.segment_size, "samples": samples,
            "mode": mode, "accuracy": value, "backend": rmt.backend,
            "backend_choice": rmt.choice.describe() if rmt.choice else None,
            "precision": getattr(rmt.engine, "precision", "fp32"),
            "seconds": round(time.perf_counter() - started, 1),
        }))


def _tolerances(_ctx, _param, values: tuple[str, ...]) -> dict[str, float] | None:
    """``--atol 1e-4 --atol logits:1e-3``: a default and per-output values (Polygraphy's
    syntax)."""
    if not values:
        return None
    parsed = {}
    for value in values:
        name, _, number = value.rpartition(":")
        try:
            parsed[name] = float(number)
        except ValueError:
            raise click.BadParameter(f"{value!r}: give VALUE or OUTPUT:VALUE, e.g. "
                                     "logits:1e-3") from None
        if not (math.isfinite(parsed[name]) and parsed[name] >= 0):
            raise click.BadParameter(f"{value!r}: must be a finite number >= 0")
    return parsed


@click.command(context_settings=SETTINGS, epilog=EXIT_STATUS.replace(
    "1 error", "1 drift or error"))
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidates", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--segments", type=click.IntRange(min=2), default=64, show_default=True,
              help="Segments of the longest document (closed loop).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Of the documents.")
@click.option("--atol", multiple=True, callback=_tolerances, metavar="[OUTPUT:]VALUE",
              help="Open-loop absolute tolerance, per output or for all  [default: 1e-4].")
@click.option("--rtol", multiple=True, callback=_tolerances, metavar="[OUTPUT:]VALUE",
              help="Open-loop relative tolerance, per output or for all  [default: 1e-5].")
@click.option("--closed-loop-atol", type=TOLERANCE, default=1e-3, show_default=True,
              help="Largest closed-loop error of any output.")
@click.option("--min-memory-cosine", type=COSINE, default=0.999,
              show_default=True, help="Worst closed-loop cosine of a memory slot.")
@click.option("--min-agreement", type=SHARE, default=0.99, show_default=True,
              help="Share of closed-loop predictions (argmax) that must agree.")
@click.option("--backend", type=click.Choice(["onnxruntime", "openvino", "tensorrt"]),
              help="Backend of export folders and graphs [default: onnxruntime].")
@_authors_checkpoint_options
@click.option("--plot", type=click.Path(path_type=Path), metavar="FILE.png",
              help="Draw memory cosine and max abs error per segment (needs matplotlib); "
                   "an existing FILE.png must be a plot rmt-compare wrote.")
@click.option("--overwrite", is_flag=True,
              help="--plot: replace FILE.png even if rmt-compare did not write it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--threads", type=int, callback=_positive, help="CPU threads of torch and "
              "ONNX Runtime "
              "[default: the CPUs not kept busy by other processes, by the 1-minute load, "
              "at least 1].")
@_user_errors("rmt-compare", "comparing the artifacts")
def compare_main(reference, candidates, segments, seed, atol, rtol, closed_loop_atol,
                 min_memory_cosine, min_agreement, backend, base_model, input_size,
                 segment_size, labels, lora_alpha, armt_correction, sliding_window, plot,
                 overwrite, as_json, threads):
    """Compare each CANDIDATE with REFERENCE, open and closed loop, on the same documents.

    Each is a checkpoint (own format, or the authors' with --base-model), an export
    folder, one of its step graphs (model.onnx, model.fp16.onnx, model.int8.onnx) or its
    model.plan, all of one model. Prints a table and a verdict; exits 1 on drift, naming
    the first output and segment that fail.
    """
    if plot is not None:  # before the (slow) comparison: a refused plot fails fast
        from rmt_deploy.export.plot_file import check_plot_target

        check_plot_target(plot, (reference, *candidates), base_model, overwrite)
    from rmt_deploy.errors import ValidationError
    from rmt_deploy.export.compare import CompareOptions, compare_artifacts, format_table
    from rmt_deploy.model.checkpoint import AuthorsOptions

    options = CompareOptions(
        segments=segments, seed=seed, atol=atol or {"": 1e-4}, rtol=rtol or {"": 1e-5},
        closed_loop_atol=closed_loop_atol, min_memory_cosine=min_memory_cosine,
        min_agreement=min_agreement, backend=backend,
        authors=AuthorsOptions(base_model, input_size, segment_size, labels, lora_alpha,
                               armt_correction, sliding_window), threads=threads)
    report = compare_artifacts(reference, candidates, options)
    if plot is not None:
        from rmt_deploy.export.drift_plot import plot_drift

        plot_drift(report, plot)
        click.echo(f"wrote {plot}", err=True)
    if as_json:
        echo(json.dumps(report.to_dict()))
    else:
        for line in format_table(report):
            echo(line)
    if not report.passed:
        raise ValidationError(report.verdict())
    if not as_json:
        echo(report.verdict())
