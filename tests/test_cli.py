"""The command lines: rmt-export, rmt-run and rmt-demo. Startup stays light, a run prints
one JSON object or a short human report, and every bad input is one line on stderr and a
non-zero exit, never a traceback."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_decoder, make_encoder, write_bert_folder, write_gpt2_folder

from rmt_deploy.cli import demo_main, export_main, run_main
from rmt_deploy.demo.task import LABELS as DEMO_LABELS
from rmt_deploy.demo.task import build_tokenizer
from rmt_deploy.manifest import read_manifest
from rmt_deploy.model.checkpoint import load_checkpoint
from rmt_deploy.runtime import RMTModel, open_model
from rmt_deploy.runtime.backends.torch import TorchEngine

torch.set_num_threads(1)  # a training job shares this machine's two cores

HEAVY = ("torch", "onnxruntime", "tensorrt")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
BIN = Path(sys.executable).parent
#: 25 words of the tiny encoder's vocabulary: 25 tokens, 3 segments of 10.
ENCODER_TEXT = " ".join(f"w{(7 * i) % 45}" for i in range(25)) + "\n"
#: 21 byte-level BPE tokens for the tiny decoder (no merges; the newline has no token):
#: 5 segments of up to 5.
DECODER_TEXT = "hello world again and\n"
RUN_KEYS = {"backend", "precision", "tokens", "segments", "seconds", "tokens_per_second",
            "backend_choice", "resumed_tokens"}


# ---------------------------------------------------------------- helpers


def invoke(command, *args, input=None):
    """Run a click command in-process; stdout and stderr apart."""
    return CliRunner().invoke(command, [str(a) for a in args], input=input)


def ok(result) -> None:
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.output


def rmt_run(*args, input: bytes | None = None) -> subprocess.CompletedProcess:
    """``rmt-run`` as a real process."""
    return subprocess.run([sys.executable, "-m", "rmt_deploy.run", *map(str, args)],
                          input=input, capture_output=True, env=ENV, timeout=120, text=False)


def one_line_error(code: int, stdout: str, stderr: str, prefix: str, *fragments) -> str:
    """Exit 1, nothing on stdout, exactly one ``PREFIX: error: ...`` line on stderr."""
    assert "Traceback" not in stdout + stderr, stderr
    assert code == 1, (code, stderr)
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1 and stderr.endswith("\n"), stderr
    assert lines[0].startswith(f"{prefix}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def cli_error(result, prefix: str, *fragments) -> str:
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{type(result.exception).__name__} escaped: "
                             f"{result.exception}") from result.exception
    return one_line_error(result.exit_code, result.stdout, result.stderr, prefix, *fragments)


def process_error(proc: subprocess.CompletedProcess, prefix: str, *fragments) -> str:
    return one_line_error(proc.returncode, proc.stdout.decode(), proc.stderr.decode(), prefix,
                          *fragments)


def usage_error(result, option: str) -> None:
    """click's usage error for a bad option value: exit 2, no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    assert f"Error: Invalid value for '{option}'" in result.stderr
    assert "Traceback" not in result.stderr


def authors_bert(folder: Path) -> tuple[Path, Path, object]:
    """An authors' BERT ``model_best.pth`` and its base folder."""
    source = make_encoder(seed=5)
    m, vocab = source.rmt_config.num_mem_tokens, source.rmt_config.vocab_size
    sd = {"cls_token": torch.tensor([2]), "sep_token": torch.tensor([3]),
          "mem_token_ids": torch.arange(vocab - m, vocab)}
    sd.update({k: v.clone() for k, v in source.state_dict().items()})
    sd["model.embeddings.weight"] = sd["model.bert.embeddings.word_embeddings.weight"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model_best.pth"
    torch.save({"model_state_dict": sd, "epoch": 1}, path)
    return path, write_bert_folder(folder / "bert-base"), source


def authors_gpt2(folder: Path) -> tuple[Path, Path, object]:
    """An authors' GPT-2 ``pytorch_model.bin`` and its base folder."""
    source = make_decoder(seed=6)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pytorch_model.bin"
    torch.save({f"memory_cell.{k}": v.clone() for k, v in source.state_dict().items()}, path)
    return path, write_gpt2_folder(folder / "gpt2-base"), source


@pytest.fixture(scope="module")
def cli_encoder_export(encoder_checkpoint, tmp_path_factory) -> Path:
    """The tiny encoder exported by ``rmt-export CKPT -o OUT`` (read-only)."""
    out = tmp_path_factory.mktemp("cli") / "enc"
    result = invoke(export_main, encoder_checkpoint, "-o", out, "--threads", "1")
    ok(result)
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == f"exported to {out}"
    assert "closed loop vs PyTorch" in result.stderr
    return out


@pytest.fixture
def encoder_input(tmp_path) -> Path:
    path = tmp_path / "input.txt"
    path.write_text(ENCODER_TEXT)
    return path


# ---------------------------------------------------------------- startup


def test_importing_the_cli_loads_no_heavy_module():
    code = ("import sys, json\nimport rmt_deploy.cli\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=ENV, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    # the check itself sees a heavy import
    proc = subprocess.run([sys.executable, "-c", code.replace("rmt_deploy.cli",
                                                              "rmt_deploy.cli, onnxruntime")],
                          capture_output=True, text=True, env=ENV, timeout=60)
    assert json.loads(proc.stdout) == ["onnxruntime"]


@pytest.mark.parametrize("script", ["rmt-export", "rmt-run", "rmt-demo"])
def test_help_loads_no_heavy_module(script):
    code = ("import sys, json\nfrom rmt_deploy import cli\n"
            f"main = cli.{script.replace('rmt-', '')}_main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as exit:\n    assert not exit.code\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=ENV, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout and "--help" in proc.stdout
    assert json.loads(proc.stdout.splitlines()[-1]) == []

    # and the installed entry point itself, import by import
    executable = shutil.which(script, path=str(BIN)) or shutil.which(script)
    assert executable, f"{script} is not installed (pip install -e .)"
    proc = subprocess.run([executable, "--help"], capture_output=True, text=True,
                          env={**ENV, "PYTHONPROFILEIMPORTTIME": "1"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Usage: {script}")
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "rmt_deploy" in imported and "click" in imported
    assert not imported & set(HEAVY), imported & set(HEAVY)


# ---------------------------------------------------------------- export, then run


def test_export_then_run_encoder_json(cli_encoder_export, encoder_input):
    manifest = read_manifest(cli_encoder_export)
    assert manifest.validation["fp32"]["segments"] >= 32
    proc = rmt_run(cli_encoder_export, encoder_input, "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert set(report) == RUN_KEYS | {"label", "scores", "logits"}
    assert report["backend"] == "onnxruntime" and report["precision"] == "fp32"
    assert report["tokens"] == 25 and report["segments"] == 3
    assert report["tokens_per_second"] > 0 and report["seconds"] >= 0
    assert set(report["scores"]) == {"a", "b", "c"}
    assert sum(report["scores"].values()) == pytest.approx(1.0)
    assert len(report["logits"]) == 3
    assert report["label"] == "abc"[int(np.argmax(report["logits"]))]
    expected = open_model(cli_encoder_export, threads=1).run_one(encoder_input)
    np.testing.assert_allclose(report["logits"], expected.logits, atol=1e-6)
    assert report["label"] == expected.label

    # '-' reads the same text from stdin
    proc = rmt_run(cli_encoder_export, "-", "--json", input=ENCODER_TEXT.encode())
    assert proc.returncode == 0, proc.stderr
    from_stdin = json.loads(proc.stdout)
    for key in ("label", "scores", "logits", "tokens", "segments"):
        assert from_stdin[key] == report[key], key


def test_run_encoder_human_output(cli_encoder_export, encoder_input):
    result = invoke(run_main, cli_encoder_export, encoder_input, "--threads", "1")
    ok(result)
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    expected = open_model(cli_encoder_export, threads=1).run_one(encoder_input)
    assert lines[0] == f"answer: {expected.label} (p={expected.scores[expected.label]:.4f})"
    assert lines[1].startswith("tokens: 25  segments: 3  time: ")
    assert "backend: onnxruntime (fp32), 1 thread, measuring off" in lines[1]


def test_run_decoder_json_generate_and_stdin(decoder_export, tmp_path):
    path = tmp_path / "story.txt"
    path.write_text(DECODER_TEXT)
    result = invoke(run_main, decoder_export, path, "--json", "--threads", "1")
    ok(result)
    report = json.loads(result.stdout)
    assert result.stdout.count("\n") == 1
    assert set(report) == RUN_KEYS | {"perplexity"}
    assert report["tokens"] == 21 and report["segments"] == 5
    expected = open_model(decoder_export, threads=1).run_one(path, generate=3)
    assert math.isfinite(report["perplexity"]) and report["perplexity"] > 1

    result = invoke(run_main, decoder_export, "-", "--json", "--generate", "3",
                    input=DECODER_TEXT)
    ok(result)
    report = json.loads(result.stdout)
    assert set(report) == RUN_KEYS | {"generated", "generated_ids"}
    assert report["generated_ids"] == expected.generated_ids
    assert 1 <= len(report["generated_ids"]) <= 3
    assert all(0 <= i < 60 for i in report["generated_ids"])
    assert report["generated"] == expected.generated and isinstance(report["generated"], str)

    result = invoke(run_main, decoder_export, path, "--generate", "3")
    ok(result)
    lines = result.stdout.splitlines()
    assert lines[0] == f"generated: {expected.generated!r}"
    assert lines[1].startswith("tokens: 21  segments: 5")
    result = invoke(run_main, decoder_export, path)
    ok(result)
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == ["perplexity",
                                                                          "tokens"]


ARMT_TEXT = "the armt reads a text file and writes its state in every layer\n" * 3


def test_run_armt_on_a_text_file_as_the_reference(armt_export, armt_reference, tmp_path):
    """rmt-run on a text file with the published ARMT: its perplexity, greedy ids and
    ids sampled with --temperature/--top-k/--top-p/--seed equal the reference ARMT's
    (sampling: the reference sampler on the same seeded stream) on the text's ids as its
    tokenizer reads the whole text."""
    from generation_reference import reference_armt_generation
    from tokenizers import Tokenizer

    from rmt_deploy.model.armt import generate_armt, run_armt
    from rmt_deploy.runtime.generation import GenerationOptions

    path = tmp_path / "story.txt"
    path.write_text(ARMT_TEXT)
    ids = Tokenizer.from_file(str(armt_export.parent / "base" / "tokenizer.json")) \
        .encode(ARMT_TEXT).ids
    segments = -(-len(ids) // armt_reference.rmt_config.segment_size)
    assert segments > 10
    result = invoke(run_main, armt_export, path, "--json", "--threads", "1")
    ok(result)
    report = json.loads(result.stdout)
    assert (report["tokens"], report["segments"]) == (len(ids), segments)
    logits, _ = run_armt(armt_reference, ids)
    log_probs = torch.log_softmax(logits[:-1].double(), -1)
    expected = float(torch.exp(-log_probs[torch.arange(len(ids) - 1),
                                          torch.tensor(ids[1:])].mean()))
    assert report["perplexity"] == pytest.approx(expected, rel=1e-4)

    def generated(*options):
        result = invoke(run_main, armt_export, path, "--json", "--threads", "1", *options)
        ok(result)
        return json.loads(result.stdout)["generated_ids"]

    greedy = generated("--generate", "6")
    assert greedy == generate_armt(armt_reference, ids, 6)
    options = {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "seed": 7}
    sampled = generated("--generate", "6", *(f"--{name.replace('_', '-')}={value}"
                                             for name, value in options.items()))

    def reference(**changed):
        return reference_armt_generation(armt_reference, ids,
                                         GenerationOptions(6, **{**options, **changed}))[0]

    assert sampled == reference()
    assert reference_armt_generation(armt_reference, ids, GenerationOptions(6))[0] == greedy
    # every option reaches the sampler: without it (or another seed) the ids differ
    for changed in ({"temperature": 1.4}, {"top_k": 0}, {"top_p": 1.0}, {"seed": 8}):
        assert reference(**changed) != sampled, changed
    assert sampled != greedy


def test_run_reads_a_real_pipe_on_stdin(decoder_export):
    proc = rmt_run(decoder_export, "-", "--json", "--generate", "2",
                   input=DECODER_TEXT.encode())
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    expected = open_model(decoder_export, threads=1).run_one(DECODER_TEXT, generate=2)
    assert report["tokens"] == 21
    assert report["generated_ids"] == expected.generated_ids and "perplexity" not in report


# ---------------------------------------------------------------- --convert


@pytest.mark.parametrize("variant", ["bert", "gpt2"])
def test_convert_then_export_without_options(tmp_path, variant):
    if variant == "bert":
        path, base, source = authors_bert(tmp_path / "authors")
        options = ["--base-model", base, "--input-size", "16", "--labels", "a,b,c"]
        text = ENCODER_TEXT
    else:
        path, base, source = authors_gpt2(tmp_path / "authors")
        options = ["--base-model", base, "--segment-size", "5"]
        text = DECODER_TEXT
    converted = tmp_path / "own" / "converted.pt"
    converted.parent.mkdir()  # --convert makes no folder
    result = invoke(export_main, path, *options, "--convert", converted)
    ok(result)
    assert result.stderr.strip() == f"converted {path} ({'authors-' + variant}) to {converted}"
    assert sorted(p.name for p in converted.parent.iterdir()) == ["converted.pt"]
    assert not (path.parent / f"{path.stem}-export").exists()  # convert only, no export
    loaded = load_checkpoint(converted)
    assert loaded.format == "rmt-deploy" and loaded.rmt.rmt_config == source.rmt_config

    result = invoke(export_main, converted, "--validation-segments", "3", "--threads", "1",
                    "-q")
    ok(result)
    assert result.stdout == result.stderr == ""
    folder = tmp_path / "own" / "converted-export"
    manifest = read_manifest(folder)
    assert manifest.source["format"] == "rmt-deploy"
    assert manifest.validation["fp32"]["segments"] == 3

    result = invoke(run_main, folder, "-", "--json", input=text)
    ok(result)
    report = json.loads(result.stdout)
    from tokenizers import Tokenizer

    engine = TorchEngine(source, threads=1)
    reference = RMTModel(engine, engine.initial_state(),
                         Tokenizer.from_str(loaded.tokenizer_json)).run_one(text)
    assert report["tokens"] == reference.tokens and report["segments"] == reference.segments
    assert reference.segments == (3 if variant == "bert" else 5)
    if variant == "bert":
        np.testing.assert_allclose(report["logits"], reference.logits, atol=1e-4)
    else:
        assert report["perplexity"] == pytest.approx(reference.perplexity, rel=1e-4)


# ---------------------------------------------------------------- rmt-demo


def test_demo_generate_writes_samples_and_answers(tmp_path):
    out = tmp_path / "demo"
    result = invoke(demo_main, "generate", out, "--tokens", "300", "--samples", "2")
    ok(result)
    assert "wrote 2 sample(s) of 300 tokens" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["answers.tsv", "sample_00000.txt",
                                                     "sample_00001.txt"]
    rows = [line.split("\t") for line in (out / "answers.tsv").read_text().splitlines()]
    assert [row[0] for row in rows] == ["sample_00000.txt", "sample_00001.txt"]
    assert all(len(row) == 2 and row[1] in DEMO_LABELS for row in rows)
    tokenizer = build_tokenizer()
    for name, label in rows:
        text = (out / name).read_text()
        assert len(tokenizer.encode(text, add_special_tokens=False).ids) == 300
        assert f"went to the {label} ." in text


@pytest.mark.parametrize("variant", ["encoder", "decoder"])
def test_demo_evaluate_refuses_a_non_demo_model(variant, request):
    folder = request.getfixturevalue(f"{variant}_export")
    result = invoke(demo_main, "evaluate", folder, "--segments", "1", "--samples", "2")
    cli_error(result, "rmt-demo", "demo task needs an encoder trained on it", "bathroom")


# ---------------------------------------------------------------- bad input: rmt-run


def _copy_export(export: Path, tmp_path: Path) -> Path:
    return shutil.copytree(export, tmp_path / "export")


def _missing_input(export, tmp_path):
    return export, tmp_path / "absent.txt", ["absent.txt", "no such file"]


def _empty_input(export, tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    return export, tmp_path / "empty.txt", ["empty.txt", "empty"]


def _blank_input(export, tmp_path):
    (tmp_path / "blank.txt").write_bytes(b" \n\t\n")
    return export, tmp_path / "blank.txt", ["blank.txt", "empty"]


def _binary_input(export, tmp_path):
    (tmp_path / "data.bin").write_bytes(b"w1 w2 \x00\x01\x02 w3" * 10)
    return export, tmp_path / "data.bin", ["data.bin", "NUL bytes"]


def _latin1_input(export, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("w1 w2 caf\u00e9 w3\n".encode("latin-1"))
    return export, tmp_path / "latin1.txt", ["latin1.txt", "not UTF-8", "0xe9"]


def _directory_input(export, tmp_path):
    (tmp_path / "indir").mkdir()
    return export, tmp_path / "indir", ["indir", "is a directory"]


def _missing_model(export, tmp_path):
    return tmp_path / "no-model", None, ["no-model", "no such file or folder"]


def _text_named_onnx(export, tmp_path):
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "model.onnx").write_text("not a graph\n")
    return tmp_path / "lonely" / "model.onnx", None, ["model.onnx", "rmt.json"]


def _corrupt_graph(export, tmp_path):
    folder = _copy_export(export, tmp_path)
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64
    (folder / "model.onnx").write_bytes(bytes(data))
    return folder, None, ["model.onnx", "sha256 does not match", "re-export"]


def _corrupt_graph_with_matching_hash(export, tmp_path):
    folder = _copy_export(export, tmp_path)
    (folder / "model.onnx").write_bytes(b"\x08\x07garbage" * 50)
    manifest = json.loads((folder / "rmt.json").read_text())
    import hashlib

    manifest["graphs"]["step"]["sha256"] = hashlib.sha256(
        (folder / "model.onnx").read_bytes()).hexdigest()
    (folder / "rmt.json").write_text(json.dumps(manifest))
    return folder, None, ["model.onnx", "ONNX Runtime cannot load it"]


def _manifest_not_json(export, tmp_path):
    folder = _copy_export(export, tmp_path)
    (folder / "rmt.json").write_text('{"format": "rmt-deploy-export", ')
    return folder, None, ["rmt.json", "not valid JSON"]


def _generate_on_encoder(export, tmp_path):
    return export, None, ["generation needs a decoder"]


RUN_CASES = [_missing_input, _empty_input, _blank_input, _binary_input, _latin1_input,
             _directory_input, _missing_model, _text_named_onnx, _corrupt_graph,
             _corrupt_graph_with_matching_hash, _manifest_not_json, _generate_on_encoder]


@pytest.mark.parametrize("case", RUN_CASES, ids=[c.__name__.strip("_") for c in RUN_CASES])
def test_rmt_run_bad_input(case, encoder_export, encoder_input, tmp_path):
    model, document, fragments = case(encoder_export, tmp_path)
    args = [model, document or encoder_input, "--json"]
    if case is _generate_on_encoder:
        args += ["--generate", "3"]
    process_error(rmt_run(*args), "rmt-run", *fragments)


def test_rmt_run_random_bytes_checkpoint(tmp_path, encoder_input):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    result = invoke(run_main, path, encoder_input)
    cli_error(result, "rmt-run", "ckpt.pt", "not a readable PyTorch checkpoint")
    result = invoke(export_main, path, "-o", tmp_path / "out")
    cli_error(result, "rmt-export", "ckpt.pt", "not a readable PyTorch checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "input.txt"]


def test_rmt_run_bad_options(encoder_export, encoder_input):
    usage_error(invoke(run_main, encoder_export, encoder_input, "--threads", "0"), "--threads")
    usage_error(invoke(run_main, encoder_export, encoder_input, "--generate", "-1"),
                "--generate")
    usage_error(invoke(run_main, encoder_export, encoder_input, "--backend", "tensorflow"),
                "--backend")


# ---------------------------------------------------------------- bad input: rmt-export


@pytest.mark.parametrize("option, value", [("--labels", "a,b,a"), ("--labels", "a,,b"),
                                           ("--atol", "-1"), ("--closed-loop-atol", "0"),
                                           ("--validation-segments", "1")])
def test_rmt_export_bad_option_values(encoder_checkpoint, tmp_path, option, value):
    result = invoke(export_main, encoder_checkpoint, "-o", tmp_path / "out", option, value)
    usage_error(result, option)
    assert list(tmp_path.iterdir()) == []


def test_rmt_export_refuses_an_existing_non_export_folder(encoder_checkpoint, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("do not lose this")
    result = invoke(export_main, encoder_checkpoint, "-o", out, "--threads", "1")
    cli_error(result, "rmt-export", "mine", "not an rmt-export folder")
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "do not lose this"


def test_rmt_export_refuses_a_target_below_a_file(encoder_checkpoint, tmp_path):
    (tmp_path / "afile").write_text("x")
    result = invoke(export_main, encoder_checkpoint, "-o", tmp_path / "afile" / "out")
    cli_error(result, "rmt-export", "afile", "not a folder")
    result = invoke(export_main, encoder_checkpoint, "--convert", tmp_path / "afile" / "c.pt")
    cli_error(result, "rmt-export", "afile", "not a folder")
    result = invoke(export_main, encoder_checkpoint, "--convert", tmp_path)
    cli_error(result, "rmt-export", "is a folder", "--convert")
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


@pytest.mark.parametrize("variant", ["bert", "gpt2"])
def test_rmt_export_authors_checkpoint_without_base_model(tmp_path, variant):
    path, _base, _source = (authors_bert if variant == "bert" else authors_gpt2)(tmp_path)
    for extra in ([], ["--convert", tmp_path / "c.pt"]):
        result = invoke(export_main, path, *extra)
        cli_error(result, "rmt-export", path.name, "--base-model")
    assert not (tmp_path / f"{path.stem}-export").exists()
    assert not (tmp_path / "c.pt").exists()


def test_rmt_export_missing_checkpoint(tmp_path):
    result = invoke(export_main, tmp_path / "nope.pt")
    cli_error(result, "rmt-export", "nope.pt", "no such file")
    assert list(tmp_path.iterdir()) == []


def test_host_errors_such_as_permission_denied_are_one_line(monkeypatch, encoder_checkpoint):
    import rmt_deploy.export.pipeline as pipeline

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/srv/models/out")

    monkeypatch.setattr(pipeline, "export_checkpoint", refuse)
    result = CliRunner().invoke(export_main, [str(encoder_checkpoint)])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "rmt-export: error: /srv/models/out: Permission denied; check the path and its "
        "permissions and free space"
    ]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="TensorRT is installed here")
def test_engine_without_tensorrt_says_so_and_still_writes_the_onnx(encoder_checkpoint, tmp_path):
    out = tmp_path / "exp"
    result = invoke(export_main, encoder_checkpoint, "-o", out, "--engine", "-q")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "TensorRT is not installed" in lines[0]
    assert "pip install tensorrt" in lines[0] and str(out) in lines[0]
    assert (out / "model.onnx").is_file() and (out / "rmt.json").is_file()


def test_a_bad_batch_profile_fails_before_exporting(encoder_checkpoint, tmp_path):
    out = tmp_path / "exp"
    result = invoke(export_main, encoder_checkpoint, "-o", out, "--engine", "--batch", "4,2,8")
    assert result.exit_code == 1 and "--batch" in result.stderr
    assert not out.exists()


# ---------------------------------------------------------------- --convert targets


def test_convert_refuses_to_replace_without_overwrite(encoder_checkpoint, tmp_path):
    out = tmp_path / "old.pt"
    out.write_bytes(b"an older conversion")
    result = invoke(export_main, encoder_checkpoint, "--convert", out)
    cli_error(result, "rmt-export", "old.pt: exists", "--overwrite")
    assert out.read_bytes() == b"an older conversion"
    ok(invoke(export_main, encoder_checkpoint, "--convert", out, "--overwrite"))
    assert load_checkpoint(out).format == "rmt-deploy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.pt"]


def test_convert_refuses_its_input_an_export_and_the_base_model(encoder_export, tmp_path):
    path, base, _ = authors_bert(tmp_path / "authors")
    export = shutil.copytree(encoder_export, tmp_path / "export")
    options = ["--base-model", base, "--overwrite"]
    for target, words in ((path, "is the checkpoint being converted"),
                          (export / "model.onnx", "inside the export folder"),
                          (export / "new.pt", "inside the export folder"),
                          (base / "config.json", "inside the base model")):
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        cli_error(invoke(export_main, path, *options, "--convert", target), "rmt-export",
                  words)
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------- the last-resort handler


def _broken(*args, **kwargs):
    raise ValueError("a bug\nover two lines")


@pytest.mark.parametrize("command, args, target, doing", [
    (run_main, ["MODEL", "INPUT"], "rmt_deploy.runtime.open_model", "running the model"),
    (export_main, ["CKPT", "-q"], "rmt_deploy.export.pipeline.export_checkpoint",
     "exporting the checkpoint"),
    (demo_main, ["generate", "OUT", "--tokens", "20"], "rmt_deploy.demo.task.write_inputs",
     "generating samples"),
])
def test_an_unexpected_error_is_one_line_naming_the_operation(command, args, target, doing,
                                                              monkeypatch, encoder_export,
                                                              encoder_checkpoint, tmp_path):
    monkeypatch.setattr(target, _broken)
    monkeypatch.delenv("RMT_DEBUG", raising=False)
    (tmp_path / "in.txt").write_text(ENCODER_TEXT)
    values = {"MODEL": encoder_export, "INPUT": tmp_path / "in.txt",
              "CKPT": encoder_checkpoint, "OUT": tmp_path / "out"}
    args = [values.get(a, a) for a in args]
    result = invoke(command, *args)
    assert result.exit_code == 70, result.output
    assert isinstance(result.exception, SystemExit)
    name = {run_main: "rmt-run", export_main: "rmt-export", demo_main: "rmt-demo"}[command]
    assert result.stderr.splitlines() == [
        f"{name}: internal error while {doing}: ValueError: a bug over two lines (a bug; run "
        "again with RMT_DEBUG=1 to see the traceback)"]
    monkeypatch.setenv("RMT_DEBUG", "1")
    result = invoke(command, *args)
    assert isinstance(result.exception, ValueError)  # re-raised: the traceback shows


def test_serving_commands_have_the_last_resort_handler(monkeypatch, encoder_export, tmp_path):
    from rmt_deploy.serving.cli import triton_main

    monkeypatch.setattr("rmt_deploy.serving.repository.write_repository", _broken)
    monkeypatch.delenv("RMT_DEBUG", raising=False)
    result = invoke(triton_main, tmp_path / "repo", "--model", encoder_export)
    assert result.exit_code == 70
    assert result.stderr.startswith("rmt-triton: internal error while writing the repository "
                                    "entry: ValueError: a bug over two lines")


@pytest.mark.parametrize("command", [export_main, run_main, demo_main])
def test_help_documents_the_exit_status(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "70 internal error" in text and "RMT_DEBUG=1" in text and "143 terminated" in text


def test_sigterm_becomes_an_exit_143_and_the_handler_is_restored(monkeypatch, encoder_export,
                                                                  tmp_path):
    import signal

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr("rmt_deploy.runtime.open_model", terminated)
    before = signal.getsignal(signal.SIGTERM)
    (tmp_path / "in.txt").write_text(ENCODER_TEXT)
    result = invoke(run_main, encoder_export, tmp_path / "in.txt")
    assert result.exit_code == 143
    assert result.stderr == "rmt-run: terminated\n"
    assert signal.getsignal(signal.SIGTERM) is before


def test_run_samples_with_a_seed_and_refuses_sampling_options_alone(memory_decoder_export,
                                                                   tmp_path):
    from rmt_deploy.runtime.generation import GenerationOptions

    decoder_export = memory_decoder_export  # its sampled tokens depend on its memory
    path = tmp_path / "story.txt"
    path.write_text(DECODER_TEXT)
    args = [decoder_export, path, "--json", "--generate", "6", "--temperature", "1.5",
            "--top-k", "20", "--top-p", "0.9", "--seed", "7", "--threads", "1"]
    runs = [invoke(run_main, *args) for _ in range(2)]
    for result in runs:
        ok(result)
    first, second = (json.loads(result.stdout) for result in runs)
    assert first["generated_ids"] == second["generated_ids"]  # seeded: the same tokens
    assert 1 <= len(first["generated_ids"]) <= 6
    options = GenerationOptions(6, temperature=1.5, top_k=20, top_p=0.9, seed=7)
    expected = open_model(decoder_export, threads=1).run_one(path, generate=options)
    assert first["generated_ids"] == expected.generated_ids  # every option reaches the sampler
    for extra, words in ((["--temperature", "1"], "add --generate N"),
                         (["--generate", "3", "--seed", "1"], "give a --temperature")):
        result = invoke(run_main, decoder_export, path, *extra)
        assert result.exit_code == 1 and words in result.stderr, result.stderr
