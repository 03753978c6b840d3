"""The sliding-window ARMT exported: ``rmt-export --sliding-window`` of the published
layout (LoRA, non-zero W_mv) validates open and closed loop with the window as state;
rmt-run's perplexity and greedy ids equal the reference's; sessions save and restore the
window; the window matters."""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import write_gpt2_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from armt_models import make_armt  # noqa: E402

from rmt_deploy.contract import (
    DECODE,
    PREFILL,
    STEP,
    WINDOW_IN,
    WINDOW_MASK_IN,
    WRITE,
    state_pairs,
    variant,
)
from rmt_deploy.errors import InputError
from rmt_deploy.export.pipeline import ExportOptions, export_checkpoint
from rmt_deploy.export.validate import STATE_COSINE
from rmt_deploy.manifest import read_manifest
from rmt_deploy.model.armt import generate_armt, run_armt
from rmt_deploy.model.checkpoint import save_checkpoint
from rmt_deploy.runtime import open_model
from rmt_deploy.runtime.backends.torch import TorchEngine
from rmt_deploy.runtime.generation import GenerationOptions
from rmt_deploy.runtime.loop import last_tokens, never, run_segments
from rmt_deploy.runtime.model import RMTModel
from rmt_deploy.runtime.state import pack, unpack
from rmt_deploy.runtime.stepper import Stepper
from rmt_deploy.runtime.tokens import ArraySource

torch.set_num_threads(1)

SEGMENT = 6
IDS = np.array([(5 * i + 2) % 50 for i in range(40)])  # 7 segments, the last short


def test_the_window_is_state_of_the_step_and_write_graphs_only(window_export):
    """window [batch, layers, 2, kv heads, segment, head dim] and window_mask [batch,
    segment], FP32, in and out of the step and write graphs; prefill and decode read
    neither (the authors' generate attends to no window)."""
    folder, reference = window_export
    manifest = read_manifest(folder)
    config = manifest.config
    assert config.sliding_window and reference.rmt_config == config
    names = [pair.name_in for pair in state_pairs(config)]
    assert names == ["A.0", "z.0", "A.1", "z.1", "started", WINDOW_IN, WINDOW_MASK_IN]
    window = (config.cache_layers, 2, config.cache_heads, SEGMENT, config.head_dim)
    for name, graph in manifest.graphs.items():
        model = onnx.load(str(folder / graph.file), load_external_data=False)
        inputs = {v.name: v.type.tensor_type for v in model.graph.input}
        outputs = {v.name: v.type.tensor_type for v in model.graph.output}
        carries = name in (STEP, WRITE)
        assert (WINDOW_IN in inputs and WINDOW_MASK_IN in inputs) == carries, name
        assert ("window_out" in outputs and "window_mask_out" in outputs) == carries, name
        if carries:
            assert tuple(d.dim_value for d in inputs[WINDOW_IN].shape.dim[1:]) == window
            assert len(outputs["window_out"].shape.dim) == 1 + len(window)
            assert {kind.elem_type for kind in (inputs[WINDOW_IN], outputs["window_out"],
                                                inputs[WINDOW_MASK_IN],
                                                outputs["window_mask_out"])} == {
                onnx.TensorProto.FLOAT}
    for name in (PREFILL, DECODE):
        assert WINDOW_IN not in [pair.name_in for pair in variant(config, name).reads]


def test_validated_open_and_closed_loop_with_the_window(window_export):
    results = read_manifest(window_export[0]).validation["fp32"]
    for loop in ("open_loop", "closed_loop"):
        errors = results[loop]["max_abs"]
        assert {"window_out", "window_mask_out", "write_window_out"} <= set(errors)
        assert errors["window_mask_out"] == 0 and errors["window_out"] < 1e-4
        assert results[loop]["agreement"] == 1.0
    assert results["generation"]["generated_same"] == 1.0


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_perplexity_and_greedy_ids_equal_the_reference(window_export, backend):
    """Perplexity with the window; greedy ids as the authors' generate makes them, whose
    earlier segments run without the window (the runtime clears it before each)."""
    if backend == "openvino":
        pytest.importorskip("openvino", reason="openvino is not installed")
    folder, reference = window_export
    expected = _perplexity(run_armt(reference, IDS)[0])
    assert abs(expected - _perplexity(run_armt(reference, IDS, window=False)[0])) > 1e-3
    model = open_model(folder, backend=backend, threads=1)
    assert model.run_one(IDS).perplexity == pytest.approx(expected, rel=1e-5)
    expected_ids = generate_armt(reference, IDS, 6)
    assert model.run_one(IDS, generate=6).generated_ids == expected_ids
    torch_model = RMTModel(TorchEngine(reference), TorchEngine(reference).initial_state())
    assert torch_model.run_one(IDS, generate=6).generated_ids == expected_ids


def test_generation_reads_its_context_without_the_window(window_export):
    """The earlier segments of a generation run as the authors' generate runs them: the
    ids differ from those generated after a context read with the window."""
    folder, _ = window_export
    model = open_model(folder, backend="onnxruntime", threads=1)
    source = ArraySource(IDS, model.config)
    with Stepper(model.engine) as stepper:
        stepper.add(0, model.initial_state)
        run_segments(stepper, [source], lambda *_: None, skip_last=True, wants_logits=never)
        windowed = stepper.generate([0], [last_tokens(source, model.config)],
                                    GenerationOptions(6))[0]
    assert windowed != model.run_one(IDS, generate=6).generated_ids


def test_a_session_saves_and_restores_the_window(window_export):
    folder, _ = window_export
    model = open_model(folder, backend="onnxruntime", threads=1)
    whole = model.session()
    whole.feed(IDS)
    session = model.session()
    session.feed(IDS[:15])
    header, arrays = unpack(session.save())
    mask = arrays["state/" + WINDOW_MASK_IN]
    assert mask.max() == 1 and np.abs(arrays["state/" + WINDOW_IN]).max() > 0
    restored = model.restore_session(pack(header, arrays))
    restored.feed(IDS[15:])
    got, expected = unpack(restored.save())[1], unpack(whole.save())[1]
    for name in (WINDOW_IN, WINDOW_MASK_IN):
        np.testing.assert_allclose(got["state/" + name], expected["state/" + name], atol=1e-5)
    assert restored.close().perplexity == pytest.approx(whole.close().perplexity, rel=1e-5)
    for name, value, says in ((WINDOW_MASK_IN, 0.5, "values other than 0 and 1"),
                              (WINDOW_IN, np.nan, "NaN or infinity")):
        damaged = {**arrays, "state/" + name: np.full_like(arrays["state/" + name], value)}
        with pytest.raises(InputError, match=f"state {name} holds {says}"):
            model.restore_session(pack(header, damaged))
    arrays["state/" + WINDOW_IN] = arrays["state/" + WINDOW_IN][..., :-1]
    with pytest.raises(InputError, match="state window is float32"):
        model.restore_session(pack(header, arrays))


def test_the_window_matters(window_export):
    """The same segment from the same (A, z) with the window zeroed gives other logits,
    on the export as on the reference."""
    folder, reference = window_export
    engine = open_model(folder, backend="onnxruntime", threads=1).engine
    torch_engine = TorchEngine(reference)
    first = torch_engine.new_state({name: value[None]
                                    for name, value in torch_engine.initial_state().items()})
    ids = IDS[None, :SEGMENT].astype(np.int64)
    first.step(ids, np.ones_like(ids), logits=False)
    state = first.state()
    assert state[WINDOW_MASK_IN].tolist() == [[1.0] * SEGMENT]
    zeroed = {**state, WINDOW_IN: np.zeros_like(state[WINDOW_IN]),
              WINDOW_MASK_IN: np.zeros_like(state[WINDOW_MASK_IN])}
    ids = IDS[None, SEGMENT: 2 * SEGMENT].astype(np.int64)
    with_window = engine.new_state(state).step(ids, np.ones_like(ids))
    without = engine.new_state(zeroed).step(ids, np.ones_like(ids))
    np.testing.assert_allclose(with_window, torch_engine.new_state(state).step(
        ids, np.ones_like(ids)), atol=1e-4)
    assert np.abs(with_window - without).max() > 1e-2


def _perplexity(logits: torch.Tensor) -> float:
    """The perplexity of IDS's next-token predictions from its token logits."""
    log_probs = torch.log_softmax(logits[:-1].double(), -1)
    return float(torch.exp(-log_probs[torch.arange(len(IDS) - 1),
                                      torch.from_numpy(IDS[1:])].mean()))


def window_in_fp32(folder: Path, manifest, precision: str) -> onnx.ModelProto:
    """Check that the step graph of ``precision`` takes and gives the window in FP32 and
    that a session of it carries a window; return the graph."""
    model = onnx.load(str(folder / manifest.graphs[f"step.{precision}"].file),
                      load_external_data=False)
    typed = {v.name: v.type.tensor_type.elem_type
             for v in (*model.graph.input, *model.graph.output)}
    assert {typed[name] for name in (WINDOW_IN, WINDOW_MASK_IN, "window_out",
                                     "window_mask_out")} == {onnx.TensorProto.FLOAT}
    session = open_model(folder, backend="onnxruntime", threads=1,
                         precision=precision).session()
    session.feed(IDS)
    assert np.abs(unpack(session.save())[1]["state/" + WINDOW_IN]).max() > 0
    return model


def test_fp16_graphs_carry_the_window_in_fp32(tmp_path):
    """--precision fp16: the layers compute the keys and values in FP16, the window
    crosses every graph's boundary in FP32 (one state for every precision), and the FP16
    graphs pass their closed-loop judgement with it."""
    rmt = make_armt(correction=False, sliding_window=True)
    options = ExportOptions(precision="fp16", drift_segments=60, threads=1)
    manifest = export_checkpoint(save_checkpoint(rmt, tmp_path / "armt.pt", None),
                                 tmp_path / "export", options)
    fp16 = manifest.validation["fp16"]["closed_loop"]
    assert fp16["agreement"] >= 0.99 and fp16["max_abs"]["window_out"] < 1e-2
    model = window_in_fp32(tmp_path / "export", manifest, "fp16")
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


def test_int8_graphs_carry_the_window_in_fp32_and_gate_it(tmp_path):
    """--precision int8: the window crosses the graph's boundary in FP32, every policy's
    closed loop is judged on the window as on (A, z), a policy that turns the window is
    not chosen, and the chosen graph keeps every pair's cosine and the predictions."""
    rmt = make_armt(correction=False, sliding_window=True)
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for i in range(8):
        line = ["the quick brown fox jumps over the lazy dog", "hello world again"][i % 2]
        (calibration / f"{i}.txt").write_text(" ".join([line] * (20 + i)))
    tokenizer = (write_gpt2_folder(tmp_path / "base", "llama") / "tokenizer.json").read_text()
    options = ExportOptions(precision="int8", calibration=calibration, drift_segments=20,
                            threads=1)
    manifest = export_checkpoint(save_checkpoint(rmt, tmp_path / "armt.pt", tokenizer),
                                 tmp_path / "export", options)
    int8 = manifest.validation["int8"]
    judged = {name: candidate["errors"]["closed_loop"]
              for name, candidate in int8["candidates"].items()}
    assert all("window_out" in loop["max_abs"] for loop in judged.values())
    assert "window_out" in {loop["cosine_output"] for loop in judged.values()}
    turned = [name for name, loop in judged.items()
              if loop["min_memory_cosine"] < STATE_COSINE["int8"]]
    assert turned and int8["policy"] not in turned  # the gate had something to refuse
    assert int8["closed_loop"]["min_memory_cosine"] >= STATE_COSINE["int8"]
    assert int8["closed_loop"]["agreement"] >= 0.99
    window_in_fp32(tmp_path / "export", manifest, "int8")


def test_the_triton_repository_carries_the_window_as_sequence_state(window_export, tmp_path):
    """rmt-triton's onnxruntime repository: Triton's implicit state holds the window and
    its mask beside (A, z) and started, each starting at zeros."""
    text_format = pytest.importorskip("google.protobuf.text_format")
    pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from rmt_deploy.serving.cli import triton_main

    folder, _ = window_export
    result = CliRunner().invoke(triton_main, [str(tmp_path), "--model", str(folder),
                                              "--backend", "onnxruntime",
                                              "--strategy", "direct"])
    assert result.exit_code == 0, result.output
    config = text_format.Parse((tmp_path / "rmt" / "config.pbtxt").read_text(),
                               pb2.ModelConfig())
    states = {s.input_name: (s.output_name, list(s.dims), s.initial_state[0].zero_data)
              for s in config.sequence_batching.state}
    manifest = read_manifest(folder)
    assert list(states) == [pair.name_in for pair in state_pairs(manifest.config)]
    window = [manifest.config.cache_layers, 2, manifest.config.cache_heads, SEGMENT,
              manifest.config.head_dim]
    assert states[WINDOW_IN] == ("window_out", window, True)
    assert states[WINDOW_MASK_IN] == ("window_mask_out", [SEGMENT], True)


def test_rmt_compare_lists_the_window_in_aligned_columns(window_export):
    """rmt-compare of the export against its step graph: the window's outputs are
    compared like every state pair, and the table's columns stay aligned although
    ``write_window_mask_out`` is longer than the usual name column."""
    from rmt_deploy.cli import compare_main

    folder, _ = window_export
    result = CliRunner().invoke(compare_main, [str(folder), str(folder / "model.onnx"),
                                               "--segments", "4", "--threads", "1"])
    assert result.exit_code == 0, result.output
    table = [line for line in result.stdout.splitlines() if line.startswith("  ")]
    names = [line.split()[0] for line in table]
    assert {"window_out", "window_mask_out", "write_window_mask_out"} <= set(names)
    ends = set()  # where each state row's open- and closed-loop errors end
    for line in table:
        name, *errors = line.split()
        if name.endswith("_out"):
            ends.add((line.index(errors[0], 2 + len(name)) + len(errors[0]), len(line)))
    assert len(ends) == 1
