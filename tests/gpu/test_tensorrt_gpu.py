"""Real TensorRT on a real GPU (marked ``tensorrt``): plans built through Polygraphy and
kept by their closed-loop check, parity with ONNX Runtime over 1,000 segments, CUDA
graphs equal to plain steps, and one state over 10,000 segments with device memory
flat. Every test skips, with the reason, where TensorRT, cuda-python or a GPU is absent."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from rmt_deploy.errors import BackendError

pytestmark = pytest.mark.tensorrt
pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install tensorrt "
                    "cuda-python on a host with an NVIDIA GPU)")


@pytest.fixture(scope="module")
def device():
    from rmt_deploy.runtime.backends import _cuda

    try:
        return _cuda.device_name_and_capability()
    except BackendError as error:
        pytest.skip(f"no CUDA device usable through cuda-python: {error}")


def free_device_memory() -> int:
    from rmt_deploy.runtime.backends import _cuda

    free, _ = _cuda.call(_cuda.cudart().cudaMemGetInfo())
    return int(free)


@pytest.fixture(scope="module")
def encoder_plans(device, encoder_export, tmp_path_factory):
    from rmt_deploy.contract import BatchProfile
    from rmt_deploy.export.tensorrt_build import EngineOptions, build_engines

    folder = shutil.copytree(encoder_export, tmp_path_factory.mktemp("gpu") / "enc")
    build_engines(folder, EngineOptions(BatchProfile(1, 4, 8), drift_segments=200))
    return folder


def test_plans_are_built_and_kept_by_their_closed_loop_check(encoder_plans, device):
    import tensorrt

    from rmt_deploy.manifest import read_manifest

    manifest = read_manifest(encoder_plans)
    assert set(manifest.engines) == {"step", "write"}
    for record in manifest.engines.values():
        assert (record["tensorrt"], record["gpu"]) == (tensorrt.__version__, device[0])
    check = manifest.validation["tensorrt"]
    assert check["segments"] == 200 and check["closed_loop"]["agreement"] >= 0.99


def test_closed_loop_parity_with_onnxruntime_over_1000_segments(encoder_plans):
    from rmt_deploy.export.comparator import compare
    from rmt_deploy.export.plan_check import PLAN_GATES
    from rmt_deploy.export.validate import enforce_drift
    from rmt_deploy.manifest import read_manifest
    from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine
    from rmt_deploy.runtime.backends.tensorrt import TensorRTEngine

    manifest = read_manifest(encoder_plans)
    results = compare(OnnxRuntimeEngine(manifest, device="cpu"), TensorRTEngine(manifest),
                      manifest.load_initial_state(), 1000)
    enforce_drift(results, PLAN_GATES["fp32"], "the TensorRT plans")
    assert results.open_loop.max_abs["memory_out"] < 1e-4


def test_cuda_graphs_equal_plain_steps(encoder_plans):
    from rmt_deploy.runtime import open_model

    plain = open_model(encoder_plans / "model.plan")
    graphs = open_model(encoder_plans / "model.plan", cuda_graphs=True)
    size = plain.config.segment_size
    rng = np.random.default_rng(0)
    docs = [rng.integers(5, 45, n) for n in (3, 40 * size + 1, 17 * size)]
    for a, b in zip(plain.run(docs).outputs, graphs.run(docs).outputs, strict=True):
        np.testing.assert_allclose(a.memory, b.memory, atol=1e-6)
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-6)


def test_one_state_over_10000_segments_keeps_device_memory_flat(encoder_plans):
    from rmt_deploy.runtime import open_model

    model = open_model(encoder_plans / "model.plan", cuda_graphs=True)
    size = model.config.segment_size
    rng = np.random.default_rng(1)
    before = free_device_memory()
    with model.session(total_tokens=10_000 * size) as session:
        session.feed(rng.integers(5, 45, 1000 * size))
        settled = free_device_memory()
        for _ in range(9):
            session.feed(rng.integers(5, 45, 1000 * size))
        assert free_device_memory() == settled  # nothing allocated after 1,000 segments
        assert session.tokens == 10_000 * size
    assert free_device_memory() >= before - (1 << 20)  # closing gave it back


def test_a_decoder_generates_on_tensorrt_as_on_onnxruntime(device, decoder_export, tmp_path):
    from rmt_deploy.export.tensorrt_build import EngineOptions, build_engines
    from rmt_deploy.runtime import open_model

    folder = shutil.copytree(decoder_export, tmp_path / "dec")
    build_engines(folder, EngineOptions(drift_segments=100))
    reference, plans = open_model(folder, backend="onnxruntime"), open_model(folder / "model.plan")
    docs = [np.random.default_rng(2).integers(5, 55, n) for n in (7, 53)]
    for a, b in zip(reference.run(docs, generate=6).outputs, plans.run(docs, generate=6).outputs,
                    strict=True):
        assert a.generated_ids == b.generated_ids


def test_an_fp16_plan_keeps_the_fp16_graphs_accuracy(device, encoder_checkpoint, tmp_path):
    from rmt_deploy.export.pipeline import ExportOptions, export_checkpoint
    from rmt_deploy.export.tensorrt_build import EngineOptions, build_engines

    folder = export_checkpoint(encoder_checkpoint, tmp_path / "fp16", ExportOptions(
        precision="fp16", drift_segments=100)).folder
    manifest = build_engines(folder, EngineOptions(drift_segments=300))
    assert manifest.engines["step"]["precision"] == "fp16"
    assert manifest.validation["tensorrt"]["closed_loop"]["agreement"] >= 0.99


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_armt_plans_are_kept_and_run_as_onnxruntime(device, armt_export, tmp_path, precision):
    """The published ARMT (LoRA, no correction): TensorRT parses and builds every graph
    (the DPFP reads and writes, the state pairs), keeps the plans by their closed-loop and
    generation checks, and the FP32 plans' perplexity and greedy ids equal ONNX Runtime's;
    FP16 plans (from rmt-export --precision fp16) keep every state pair FP32."""
    from published_layouts import export_published

    from rmt_deploy.contract import BatchProfile, state_pairs
    from rmt_deploy.export.tensorrt_build import EngineOptions, build_engines
    from rmt_deploy.runtime import open_model

    folder = shutil.copytree(armt_export, tmp_path / "armt")
    if precision == "fp16":
        root, folder = armt_export.parent, tmp_path / "armt-fp16"
        result = export_published(root / "ckpt" / "model.safetensors", root / "base",
                                  "--no-armt-correction", "--precision", "fp16",
                                  "--drift-segments", "100", "-o", str(folder))
        assert result.exit_code == 0, result.output
    manifest = build_engines(folder, EngineOptions(BatchProfile(1, 2, 4), max_new_tokens=8,
                                                   drift_segments=200))
    assert {record["precision"] for record in manifest.engines.values()} == {precision}
    check = manifest.validation["tensorrt"]
    names = {pair.name_out for pair in state_pairs(manifest.config)}
    assert names <= set(check["closed_loop"]["max_abs"])
    assert check["generation"]["generated_same"] >= 0.99
    import tensorrt

    state = {name for pair in state_pairs(manifest.config)
             for name in (pair.name_in, pair.name_out)}
    runtime = tensorrt.Runtime(tensorrt.Logger(tensorrt.Logger.WARNING))
    for record in manifest.engines.values():
        engine = runtime.deserialize_cuda_engine((folder / record["file"]).read_bytes())
        io = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        assert {"A.0", "z.0"} <= set(io)  # every plan reads the state
        for name in state & set(io):
            assert np.dtype(tensorrt.nptype(engine.get_tensor_dtype(name))) == np.float32
    plans = open_model(folder / "model.plan")
    if precision == "fp32":
        reference = open_model(folder, backend="onnxruntime")
        docs = [np.random.default_rng(3).integers(5, 50, n) for n in (9, 40)]
        for a, b in zip(reference.run(docs).outputs, plans.run(docs).outputs, strict=True):
            assert b.perplexity == pytest.approx(a.perplexity, rel=1e-4)
        for a, b in zip(reference.run(docs, generate=6).outputs,
                        plans.run(docs, generate=6).outputs, strict=True):
            assert a.generated_ids == b.generated_ids
