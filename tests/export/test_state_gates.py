"""An ARMT's state pairs (every layer's A.i, z.i) are gated closed loop, per pair, as
well as its logits: an export whose graph writes a state wrong is refused even where
the logits still agree."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from armt_models import make_armt  # noqa: E402
from conftest import write_gpt2_folder  # noqa: E402
from graph_faults import FaultyEngine  # noqa: E402

from rmt_deploy.errors import ValidationError  # noqa: E402
from rmt_deploy.export.comparator import Comparison, LoopErrors  # noqa: E402
from rmt_deploy.export.pipeline import ExportOptions, export_checkpoint  # noqa: E402
from rmt_deploy.export.validate import (  # noqa: E402
    STATE_COSINE,
    Tolerance,
    enforce,
    enforce_states,
)
from rmt_deploy.manifest import read_manifest  # noqa: E402
from rmt_deploy.model.checkpoint import save_checkpoint  # noqa: E402
from rmt_deploy.runtime.backends import onnxruntime as ort_backend  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("armt-gates")
    tokenizer = (write_gpt2_folder(root / "base", "llama") / "tokenizer.json").read_text()
    return save_checkpoint(make_armt(correction=False), root / "armt.pt", tokenizer)


def faulty_state(monkeypatch, precision: str, output: str,
                 size: float) -> None:
    """ONNX Runtime engines of ``precision`` whose step writes ``output`` off by
    ``size`` from the second segment on."""
    real = ort_backend.OnnxRuntimeEngine

    def engine(manifest, options=None):
        made = real(manifest, options)
        return (FaultyEngine(made, "offset", segment=1, size=size, output=output)
                if made.precision == precision else made)

    monkeypatch.setattr(ort_backend, "OnnxRuntimeEngine", engine)


def test_a_state_slot_that_turns_within_the_max_abs_tolerance_fails_its_pair_gate():
    """A small slot of A_out.0 reversed: every error below 1e-3, its cosine -1."""
    loop = LoopErrors("closed_loop")
    expected = np.zeros((1, 2, 4), np.float32)
    expected[0, 0] = [1.0, 2.0, 3.0, 4.0]
    expected[0, 1] = [1e-4, 2e-4, 3e-4, 4e-4]
    actual = expected.copy()
    actual[0, 1] = -expected[0, 1]
    loop.record(0, {"A_out.0": expected}, {"A_out.0": actual}, {"A_out.0"})
    comparison = Comparison(LoopErrors("open_loop"), loop, 1, [1])
    enforce(comparison, Tolerance())  # the max abs gate lets it through
    with pytest.raises(ValidationError, match=r"^validation: closed loop cosine of state "
                       r"A_out\.0 falls to -1\.000000, below 0\.9999 \(first at segment 0\)"):
        enforce_states(comparison, "fp32", "validation")


def test_the_tolerances_are_tight_in_fp32_and_looser_reduced():
    assert STATE_COSINE["fp32"] > STATE_COSINE["fp16"] and set(STATE_COSINE) == {
        "fp32", "fp16", "int8"}


def test_an_fp16_graph_whose_state_write_drifts_is_refused(checkpoint, tmp_path, monkeypatch):
    faulty_state(monkeypatch, "fp16", "A_out.1", 3e-5)
    options = ExportOptions(precision="fp16", drift_segments=12)
    with pytest.raises(ValidationError, match=r"^the FP16 graph: closed loop cosine of "
                       r"state \S+ falls to"):
        export_checkpoint(checkpoint, tmp_path / "export", options)
    assert not (tmp_path / "export").exists()


def test_an_fp16_graph_whose_state_is_right_passes(checkpoint, tmp_path):
    options = ExportOptions(precision="fp16", drift_segments=12)
    folder = export_checkpoint(checkpoint, tmp_path / "export", options).folder
    closed = read_manifest(folder).validation["fp16"]["closed_loop"]
    assert closed["min_memory_cosine"] >= STATE_COSINE["fp16"]


def test_fp16_with_the_correction_validates_closed_loop(tmp_path):
    """The converter's FP16 round trips inside the state write (a running sum cast to
    float16 and back between FP32 nodes: NaN logits from segment 16) are gone, and 24
    closed-loop segments pass every gate. The random tiny model's near-tied logits
    agree 98% (hence 0.95 here); its A_out.0 cosine falls to 0.977 by segment 31, a
    real FP16 drift the state gate refuses."""
    import onnx

    root = tmp_path
    tokenizer = (write_gpt2_folder(root / "base", "llama") / "tokenizer.json").read_text()
    checkpoint = save_checkpoint(make_armt(correction=True), root / "armt.pt", tokenizer)
    options = ExportOptions(precision="fp16", drift_segments=24, min_agreement=0.95)
    folder = export_checkpoint(checkpoint, root / "export", options).folder
    manifest = read_manifest(folder)
    closed = manifest.validation["fp16"]["closed_loop"]
    assert closed["agreement"] >= 0.95 and closed["min_memory_cosine"] >= STATE_COSINE["fp16"]
    model = onnx.load(str(folder / manifest.graphs["step.fp16"].file), load_external_data=False)
    casts = {n.output[0]: n for n in model.graph.node if n.op_type == "Cast"}
    assert not [n for n in model.graph.node if n.op_type == "Cast" and n.input[0] in casts
                and "fp32_state" in n.name]


def test_int8_armt_keeps_its_state_arithmetic_fp32_and_passes_the_state_gates(checkpoint,
                                                                               tmp_path):
    """The chosen INT8 graph quantizes no input of the state read/write (the outer
    products, q.A, q.z, the running sums) and its closed loop keeps every pair's cosine."""
    import onnx

    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for i in range(8):
        line = ["the quick brown fox jumps over the lazy dog", "hello world again"][i % 2]
        (calibration / f"{i}.txt").write_text(" ".join([line] * (20 + i)))
    options = ExportOptions(precision="int8", calibration=calibration, drift_segments=20)
    folder = export_checkpoint(checkpoint, tmp_path / "export", options).folder
    manifest = read_manifest(folder)
    int8 = manifest.validation["int8"]
    assert int8["closed_loop"]["min_memory_cosine"] >= STATE_COSINE["int8"]
    model = onnx.load(str(folder / manifest.graphs["step.int8"].file), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    state = [n for n in model.graph.node if "fp32_state" in n.name]
    assert state
    assert not [n.name for n in state for i in n.input
                if i in producer and producer[i].op_type == "DequantizeLinear"]


def test_an_int8_policy_whose_state_drifts_is_refused_even_when_agreement_is_waived(
        checkpoint, tmp_path):
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for i in range(8):
        (calibration / f"{i}.txt").write_text(" ".join(["hello world again"] * (20 + i)))
    options = ExportOptions(precision="int8", calibration=calibration, drift_segments=20,
                            int8_policy="naive", min_agreement=0.0)
    with pytest.raises(ValidationError, match=r"^INT8 policy naive: closed loop cosine of "
                       r"state \S+ falls to"):
        export_checkpoint(checkpoint, tmp_path / "export", options)
    assert not (tmp_path / "export").exists()
