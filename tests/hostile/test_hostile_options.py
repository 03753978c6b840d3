"""Hostile option values and calibration inputs: each is refused when the command line
is parsed (a usage error naming the option) or before any export work, never a crash
after it (harness: tests/hostile/harness.py)."""

from __future__ import annotations

import io
import subprocess

import numpy as np
import pytest
from harness import BIN, ENV, TEXT, TIMEOUT, Case, build_assets, run_case


@pytest.fixture(scope="module")
def assets(encoder_checkpoint, encoder_export, tmp_path_factory):
    return build_assets(encoder_checkpoint, encoder_export, tmp_path_factory.mktemp("assets"))


def _run(*options):
    def prepare(scene):
        return [scene.export(), scene.text(), "--generate", "3", "--threads", "1", *options]
    return prepare


def _triton_run(*options):
    def prepare(scene):
        return [scene.text(), "--model", scene.export(), "--url", "127.0.0.1:1", *options]
    return prepare


def _compare(*options):
    def prepare(scene):
        return [scene.export(), scene.export("other"), "--segments", "2", *options]
    return prepare


def _export(*options):
    def prepare(scene):
        return [scene.checkpoint(), "-o", "out", "-q", "--threads", "1", *options]
    return prepare


def _lying_npy(scene):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<i8", "fortran_order": False, "shape": (10**12,)})
    (scene.work / "lie.npy").write_bytes(header.getvalue().ljust(128, b"\0"))
    return _export("--precision", "int8", "--calibration", "lie.npy")(scene)


def _calibration_folder(files):
    def prepare(scene):
        (scene.work / "cal").mkdir()
        for name, text in files.items():
            (scene.work / "cal" / name).write_text(text)
        return _export("--precision", "int8", "--calibration", "cal")(scene)
    return prepare


def _usage(name, script, prepare, option):
    return Case(name, script, prepare, code=2, says=(f"Invalid value for '{option}'",))


CASES = [
    _usage("run-seed-negative", "rmt-run", _run("--temperature", "1", "--seed", "-1"), "--seed"),
    _usage("run-seed-2-32", "rmt-run", _run("--temperature", "1", "--seed", str(2**32)),
           "--seed"),
    _usage("run-temperature-subnormal", "rmt-run", _run("--temperature", "1e-320"),
           "--temperature"),
    _usage("run-temperature-nan", "rmt-run", _run("--temperature", "nan"), "--temperature"),
    _usage("run-temperature-inf", "rmt-run", _run("--temperature", "inf"), "--temperature"),
    _usage("run-temperature-negative", "rmt-run", _run("--temperature", "-1"),
           "--temperature"),
    _usage("compare-closed-loop-atol-nan", "rmt-compare", _compare("--closed-loop-atol", "nan"),
           "--closed-loop-atol"),
    _usage("compare-min-memory-cosine-nan", "rmt-compare",
           _compare("--min-memory-cosine", "nan"), "--min-memory-cosine"),
    _usage("compare-min-agreement-nan", "rmt-compare", _compare("--min-agreement", "nan"),
           "--min-agreement"),
    _usage("compare-atol-inf", "rmt-compare", _compare("--atol", "logits:inf"), "--atol"),
    _usage("compare-seed-negative", "rmt-compare", _compare("--seed", "-1"), "--seed"),
    _usage("export-atol-nan", "rmt-export", _export("--atol", "nan"), "--atol"),
    _usage("export-closed-loop-atol-inf", "rmt-export", _export("--closed-loop-atol", "inf"),
           "--closed-loop-atol"),
    _usage("export-min-agreement-nan", "rmt-export", _export("--min-agreement", "nan"),
           "--min-agreement"),
    _usage("triton-run-chunk-tokens-0", "rmt-triton-run", _triton_run("--chunk-tokens", "0"),
           "--chunk-tokens"),
    _usage("triton-run-in-flight-0", "rmt-triton-run", _triton_run("--in-flight", "0"),
           "--in-flight"),
    _usage("triton-run-temperature-nan", "rmt-triton-run",
           _triton_run("--generate", "3", "--temperature", "nan"), "--temperature"),
    Case("triton-run-top-k-without-temperature", "rmt-triton-run",
         _triton_run("--generate", "3", "--top-k", "2"), says=("give a --temperature",)),
    Case("triton-run-no-server", "rmt-triton-run", _triton_run(),
         says=("cannot reach Triton at 127.0.0.1:1",)),
    _usage("demo-generate-seed-negative", "rmt-demo",
           lambda scene: ["generate", "samples", "--seed", "-1"], "--seed"),
    Case("export-published-options-on-an-own-checkpoint", "rmt-export",
         _export("--sliding-window", "--lora-alpha", "32"),
         says=("records its model", "--lora-alpha and --sliding-window", "leave them out"),
         absent=("out",)),
    Case("calibration-npy-header-lies", "rmt-export", _lying_npy,
         says=("lie.npy", "declares shape (1000000000000,)"), absent=("out",)),
    Case("calibration-folder-without-documents", "rmt-export",
         _calibration_folder({"notes.md": "no documents here\n"}),
         says=("holds no .txt, .npy or .npz file",), absent=("out",)),
    Case("calibration-folder-too-small", "rmt-export",
         _calibration_folder({"a.txt": "w1 w2 w3\n"}), says=("at least 2 documents",),
         absent=("out",)),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_option(case, assets, tmp_path):
    run_case(case, tmp_path, assets)


def test_bad_calibration_is_refused_before_the_fp32_export(encoder_checkpoint, tmp_path):
    """Without -q the export logs each graph it writes: none is written before the
    refusal."""
    (tmp_path / "one.txt").write_text(TEXT)
    proc = subprocess.run([str(BIN / "rmt-export"), encoder_checkpoint, "-o", tmp_path / "out",
                           "--threads", "1", "--precision", "int8", "--calibration",
                           tmp_path / "one.txt"], capture_output=True, text=True, env=ENV,
                          timeout=TIMEOUT)
    assert proc.returncode == 1, proc.stderr
    assert "at least 2 documents" in proc.stderr.splitlines()[-1]
    assert "wrote model.onnx" not in proc.stderr and not (tmp_path / "out").exists()
