"""The OpenVINO backend against ONNX Runtime on the same exported graphs."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("openvino", reason="openvino is not installed")

from rmt_deploy.export.comparator import compare  # noqa: E402
from rmt_deploy.manifest import read_manifest  # noqa: E402
from rmt_deploy.runtime import open_model  # noqa: E402
from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine  # noqa: E402
from rmt_deploy.runtime.backends.openvino import OpenVinoEngine  # noqa: E402


@pytest.mark.parametrize("export", ["encoder_export", "decoder_export"])
def test_openvino_fp32_matches_onnxruntime_open_and_closed_loop(export, request):
    manifest = read_manifest(request.getfixturevalue(export))
    errors = compare(OnnxRuntimeEngine(manifest), OpenVinoEngine(manifest, compute="fp32"),
                     manifest.load_initial_state(), segments=32)
    for loop in errors.loops:
        assert loop.max_abs["memory_out"] < 1e-4
        assert loop.max_abs["logits"] < 1e-4
        assert loop.min_memory_cosine > 0.99999


def test_openvino_runs_documents_like_onnxruntime(encoder_export):
    docs = ["w1 w2 w3 " * 30, "w7 " * 5, "w4 w9 " * 41]
    expected = open_model(encoder_export, backend="onnxruntime").run(docs)
    model = open_model(encoder_export, backend="openvino")
    actual = model.run(docs)
    assert actual.backend == "openvino" and actual.precision == "fp32"  # never BF16 unasked
    for a, b in zip(expected.outputs, actual.outputs, strict=True):
        assert a.label == b.label and a.segments == b.segments
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda doc: model.run_one(doc).logits, docs * 3))
    for index, logits in enumerate(results):
        np.testing.assert_array_equal(logits, actual.outputs[index % 3].logits)


def test_openvino_generates_like_onnxruntime(decoder_export):
    text = "ab cd ef gh ij " * 4
    expected = open_model(decoder_export, backend="onnxruntime").run_one(text, generate=5)
    actual = open_model(decoder_export, backend="openvino").run_one(text, generate=5)
    assert actual.generated_ids == expected.generated_ids and actual.perplexity is None
    scored = open_model(decoder_export, backend="openvino").run_one(text)
    assert scored.perplexity == pytest.approx(open_model(decoder_export).run_one(
        text).perplexity, rel=1e-5)


def test_a_signal_after_measuring_the_backends_is_handled(encoder_export, tmp_path):
    """Measuring the backends opens OpenVINO engines and drops the losers. OpenVINO's CPU
    plugin gives the main thread an alternate signal stack; with a Core of each engine's
    own, freed with it, that stack was left unmapped and the next SIGTERM crashed the
    process (exit 139). The process keeps one Core."""
    import os
    import subprocess
    import sys

    script = (
        "import os, signal\n"
        "from rmt_deploy.runtime import open_model\n"
        f"open_model({str(encoder_export)!r}, measure='auto')\n"
        "signal.signal(signal.SIGTERM, lambda *a: print('handled'))\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n")
    env = {**os.environ, "RMT_DEPLOY_MEASURE": "1", "RMT_DEPLOY_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env=env)
    assert (result.returncode, result.stdout.strip()) == (0, "handled"), result.stderr
