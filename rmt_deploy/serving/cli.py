"""Command-line entry points of the serving layer: ``rmt-triton`` writes a Triton model
repository entry for an export; ``rmt-triton-run`` streams a document to a served model
and prints what rmt-run prints. Exit status as rmt-run's (``rmt_deploy.cli``): 1 an
error, 70 an internal error (``RMT_DEBUG=1`` shows its traceback), 130 interrupted, 143
terminated."""

from __future__ import annotations

import json
from pathlib import Path

import click

from rmt_deploy.cli import EXIT_STATUS, SETTINGS, _user_errors, echo, stdin_stream
from rmt_deploy.errors import RmtError
from rmt_deploy.parameters import POSITIVE_SECONDS, sampling_options


@click.command(context_settings=SETTINGS, epilog=EXIT_STATUS)
@click.argument("repo", type=click.Path(path_type=Path))
@click.option("--model", "export", type=click.Path(path_type=Path), required=True,
              help="Export folder written by rmt-export.")
@click.option("--name", default="rmt", show_default=True, help="Model name in the repository.")
@click.option("--backend", type=click.Choice(["python", "onnxruntime", "tensorrt"]),
              default="python", show_default=True,
              help="python: rmt-deploy's runtime (any tritonserver with the python backend); "
                   "onnxruntime / tensorrt: the step graph with Triton's implicit state "
                   "(NGC containers).")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Sequences stepped together in one execution.")
@click.option("--idle-seconds", type=POSITIVE_SECONDS, default=3600.0,
              show_default=True, help="Release a sequence idle this long.")
@click.option("--strategy", type=click.Choice(["oldest", "direct"]), default="oldest",
              show_default=True, help="Triton's sequence batching strategy.")
@click.option("--max-sequences", type=click.IntRange(min=1), default=1024, show_default=True,
              help="oldest: sequences open at once per instance.")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model instances.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32",
              show_default=True, help="Which of the export's step graphs to serve.")
@click.option("--decoupled", is_flag=True,
              help="python backend, decoders: send generated tokens as they are made "
                   "(Triton's decoupled mode; clients then use gRPC streaming).")
@_user_errors("rmt-triton", "writing the repository entry")
def triton_main(repo, export, name, backend, max_batch_size, idle_seconds, strategy,
                max_sequences, instances, precision, decoupled):
    """Write REPO/NAME, a Triton model repository entry for an exported RMT."""
    from rmt_deploy.serving.config import ServingOptions
    from rmt_deploy.serving.repository import write_repository

    options = ServingOptions(name=name, backend=backend, max_batch_size=max_batch_size,
                             idle_seconds=idle_seconds, strategy=strategy,
                             max_candidate_sequences=max_sequences, instances=instances,
                             precision=precision, decoupled=decoupled)
    folder = write_repository(repo, export, options)
    echo(f"wrote {folder} ({backend} backend); serve it with tritonserver "
         f"--model-repository {repo}")


@click.command(context_settings=SETTINGS, epilog=EXIT_STATUS)
@click.argument("input", type=str)
@click.option("--model", "export", type=click.Path(path_type=Path), required=True,
              help="The export folder the served model was written from (tokenizer, "
                   "segmentation).")
@click.option("--url", default="127.0.0.1:8001", show_default=True, help="Triton gRPC address.")
@click.option("--name", default="rmt", show_default=True, help="Model name on the server.")
@click.option("--progress", "progress_file", type=click.Path(path_type=Path),
              help="Save progress here and resume from it when it exists.")
@click.option("--chunk-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Tokens a request carries (whole segments, at least one).")
@click.option("--in-flight", type=click.IntRange(min=1), default=2, show_default=True,
              help="Requests sent before the first of them is answered.")
@click.option("--generate", type=click.IntRange(min=0), default=0,
              help="Decoders: generate up to N tokens after the input as rmt-run --generate "
                   "does (its last segment the question, the rest the context).")
@sampling_options
@click.option("--retries", type=click.IntRange(min=0), default=5, show_default=True,
              help="Times a chunk whose server was lost (killed, restarted, unreachable) "
                   "is sent again, restarting the sequence from its last state; waits "
                   "0.25 s, doubled each time up to 4 s. 0: never.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@_user_errors("rmt-triton-run", "streaming the document")
def stream_main(input, export, url, name, progress_file, chunk_tokens, in_flight, generate,
                temperature, top_k, top_p, seed, retries, as_json):
    """Stream INPUT (a text file, '-' for stdin) to a model served by Triton as one
    sequence and print its answer as rmt-run does."""
    from rmt_deploy.runtime.generation import GenerationOptions
    from rmt_deploy.serving.client import TritonClient
    from rmt_deploy.serving.failover import DEFAULT_RETRY, RetryPolicy

    sampling = temperature > 0 or top_k or top_p < 1 or seed is not None
    if sampling and not generate:
        raise RmtError("--temperature, --top-k, --top-p and --seed shape generation; add "
                       "--generate N")
    if sampling and not temperature:
        raise RmtError("--top-k, --top-p and --seed sample: give a --temperature above 0")
    options = GenerationOptions(generate, temperature, top_k, top_p, seed) if generate \
        else None
    document = stdin_stream() if input == "-" else Path(input)
    retry = RetryPolicy(retries + 1, DEFAULT_RETRY.backoff, DEFAULT_RETRY.max_wait) if retries \
        else None
    with TritonClient(export, url, name, chunk_tokens=chunk_tokens, in_flight=in_flight,
                      retry=retry) as client:
        result = client.run(document, progress_file, generate=options)
    output = result.output
    report = {"backend": f"triton:{url}/{name}", "tokens": output.tokens,
              "segments": output.segments, "segments_sent": result.segments_sent,
              "seconds": round(result.seconds, 4), "retries": len(result.retries)}
    if hasattr(output, "label"):
        report.update(label=output.label, scores=output.scores,
                      logits=[float(x) for x in output.logits])
    elif options is not None:
        report.update(generated=output.generated, generated_ids=output.generated_ids)
    else:
        report.update(perplexity=output.perplexity)
    if as_json:
        echo(json.dumps(report))
    elif "label" in report:
        echo(f"answer: {output.label} (p={output.scores[output.label]:.4f})")
    elif options is not None:
        echo(f"generated: {output.generated!r}")
    else:
        echo(f"perplexity: {output.perplexity:.4f}")
    if not as_json:
        echo(f"tokens: {output.tokens:,}  segments: {output.segments:,} "
             f"({result.segments_sent:,} sent)  time: {result.seconds:.2f} s  "
             f"backend: triton ({url}, {name})")
