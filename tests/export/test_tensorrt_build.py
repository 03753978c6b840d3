"""Building TensorRT plans through Polygraphy's loaders, against a stand-in at Polygraphy's
boundary (tests/fake_tensorrt.py: the loaders record what they are given and "build" a
plan of the parsed graph, which the fake runtime runs with ONNX Runtime), and the
closed-loop check that decides whether a plan is kept."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from fake_tensorrt import install_fake_gpu
from graph_faults import damaged_graph

from rmt_deploy.contract import BatchProfile, profile_shapes, variant_names
from rmt_deploy.errors import BackendError, ValidationError
from rmt_deploy.export.tensorrt_build import EngineOptions, build_engines
from rmt_deploy.manifest import MANIFEST_NAME, read_manifest
from rmt_deploy.runtime import open_model


@pytest.fixture
def gpu(monkeypatch):
    return install_fake_gpu(monkeypatch)


def copy_export(export, tmp_path, name="exp"):
    return shutil.copytree(export, tmp_path / name)


def folder_state(folder):
    """Every file of a folder, hidden ones too, with its content's hash."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def drift(builder, tmp_path, fault="scale"):
    """Make every later build a plan of a damaged copy of its graph."""
    def source(path):
        return str(damaged_graph(path, tmp_path / f"damaged-{fault}-{len(builder.builds)}.onnx",
                                 fault))
    builder.plan_source = source


@pytest.mark.parametrize("version", ["10.13.0", "11.0.0"])
def test_plans_are_built_with_polygraphys_loaders_strongly_typed_without_precision_flags(
        monkeypatch, tmp_path, decoder_export, version):
    _, builder = install_fake_gpu(monkeypatch, version)
    folder = copy_export(decoder_export, tmp_path)
    cache = tmp_path / "timing.cache"
    options = EngineOptions(BatchProfile(1, 2, 4), 512, cache, max_new_tokens=8,
                            drift_segments=6)
    manifest = build_engines(folder, options)
    assert [call["path"].rsplit("/", 1)[-1] for call in builder.networks] == [
        "model.onnx", "write.onnx", "prefill.onnx", "decode.onnx"]
    assert all(call["strongly_typed"] is True for call in builder.networks)
    precision_flags = {"fp16", "int8", "bf16", "fp8", "tf32", "precision_constraints"}
    trt = builder.trt
    for graph, config in zip(variant_names(manifest.config), builder.configs, strict=True):
        assert not precision_flags & set(config)  # precision lives in the graph (11 has none)
        assert config["memory_pool_limits"] == {trt.MemoryPoolType.WORKSPACE: 512 << 20}
        (profile,) = config["profiles"]
        expected = profile_shapes(manifest.config, graph, BatchProfile(1, 2, 4), 8)
        assert {name: (s.min, s.opt, s.max) for name, s in profile.items()} == expected
    # the first build finds no cache; each later one reads what the one before wrote
    assert [config["load_timing_cache"] for config in builder.configs] == [None] + [
        str(cache)] * (len(builder.configs) - 1)
    assert all(build["save_timing_cache"] == str(cache) for build in builder.builds)
    assert cache.read_bytes() == b"timing-cache"
    record = manifest.engines["step"]
    assert (record["file"], record["precision"], record["tensorrt"], record["gpu"]) == (
        "model.plan", "fp32", version, "Fake GPU")
    assert read_manifest(folder).engines == manifest.engines
    # a second build reads the timing cache the first wrote
    build_engines(folder, EngineOptions(timing_cache=cache, drift_segments=4))
    assert builder.configs[-1]["load_timing_cache"] == str(cache)


def test_tensorrt_11_without_the_deprecated_flag_gets_no_strongly_typed_option(
        monkeypatch, tmp_path, encoder_export):
    _, builder = install_fake_gpu(monkeypatch, "11.2.0")
    builder.trt.NetworkDefinitionCreationFlag = type("Flags", (), {})  # as 11.x may drop it
    build_engines(copy_export(encoder_export, tmp_path), EngineOptions(drift_segments=4))
    assert all("strongly_typed" not in call for call in builder.networks)


def test_a_weakly_typed_network_is_refused_on_tensorrt_10(gpu, tmp_path, encoder_export,
                                                          monkeypatch):
    from rmt_deploy.export import tensorrt_build

    folder = copy_export(encoder_export, tmp_path)
    before = folder_state(folder)
    monkeypatch.setattr(tensorrt_build, "network_options", lambda trt: {})  # Polygraphy's default
    with pytest.raises(BackendError, match="weakly typed"):
        build_engines(folder, EngineOptions(drift_segments=4))
    assert folder_state(folder) == before


def test_every_plan_is_judged_closed_loop_against_fp32_and_recorded(gpu, tmp_path,
                                                                   encoder_export):
    cuda, _ = gpu
    folder = copy_export(encoder_export, tmp_path)
    lines = []
    manifest = build_engines(folder, EngineOptions(drift_segments=40), lines.append)
    check = manifest.validation["tensorrt"]
    assert check["reference"] == "fp32 graph on onnxruntime CPU"
    assert check["segments"] == 40 and check["precision"] == "fp32"
    drift_figures = check["closed_loop"]
    assert set(drift_figures["max_abs"]) == {"logits", "memory_out", "write_memory_out"}
    assert drift_figures["agreement"] == 1.0 and drift_figures["min_memory_cosine"] > 0.9999
    assert check["gates"] == {"min_agreement": 0.99, "min_memory_cosine": 0.9999,
                              "max_abs": 1e-3}
    assert any("closed loop vs fp32 graph on onnxruntime CPU over 40 segments" in line
               for line in lines)
    assert cuda.counts["context"] > 0  # the plans ran, through the TensorRT backend
    assert cuda.leaks() == {}
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []
    model = open_model(folder / "model.plan")
    expected = open_model(folder, backend="onnxruntime").run_one(np.arange(5, 45))
    np.testing.assert_array_equal(model.run_one(np.arange(5, 45)).logits, expected.logits)


@pytest.mark.parametrize("fault, message", [
    ("scale", r"the TensorRT fp32 plans: closed loop error on \w+ is .*, above the "
              r"tolerance 0.001 \(first at segment \d+\); the plans were not kept"),
    ("nan", r"the TensorRT fp32 plans: \d+ value\(s\) of \w+ are NaN or infinite in the "
            r"closed loop run \(first at segment 0\)"),
])
def test_a_plan_that_drifts_is_not_kept_and_the_folder_is_left_as_it_was(
        gpu, tmp_path, encoder_export, fault, message):
    _, builder = gpu
    folder = copy_export(encoder_export, tmp_path)
    before = folder_state(folder)
    drift(builder, tmp_path, fault)
    with pytest.raises(ValidationError, match=message):
        build_engines(folder, EngineOptions(drift_segments=8))
    assert folder_state(folder) == before  # no plan, no temporary file, the same manifest


def test_plans_run_without_swapping_their_memory_buffers_are_refused(gpu, tmp_path,
                                                                     encoder_export,
                                                                     monkeypatch):
    from rmt_deploy.contract import STEP, WRITE
    from rmt_deploy.runtime.backends import tensorrt

    def step_without_swap(self, input_ids, attention_mask, logits=True):
        graph = WRITE if not logits and WRITE in self._contexts else STEP
        return self._run(graph, input_ids, attention_mask, logits)  # memory_in never moves on

    monkeypatch.setattr(tensorrt._State, "step", step_without_swap)
    folder = copy_export(encoder_export, tmp_path)
    before = folder_state(folder)
    with pytest.raises(ValidationError, match=r"the TensorRT fp32 plans: closed loop"):
        build_engines(folder, EngineOptions(drift_segments=6))
    assert folder_state(folder) == before


def test_a_rebuild_that_drifts_keeps_the_validated_plans(gpu, tmp_path, decoder_export):
    _, builder = gpu
    folder = copy_export(decoder_export, tmp_path)
    build_engines(folder, EngineOptions(drift_segments=6))
    before = folder_state(folder)
    drift(builder, tmp_path)
    with pytest.raises(ValidationError, match="the plans were not kept"):
        build_engines(folder, EngineOptions(drift_segments=6))
    assert folder_state(folder) == before
    read_manifest(folder)  # still whole: every hash matches


def test_the_gates_follow_the_plans_precision_and_the_options(gpu, tmp_path, encoder_export):
    from rmt_deploy.export.plan_check import PLAN_GATES, plan_gates

    assert plan_gates("fp16", EngineOptions()) == PLAN_GATES["fp16"]
    gates = plan_gates("fp32", EngineOptions(min_agreement=0.5, min_memory_cosine=0.2,
                                             max_abs=3.0))
    assert (gates.min_agreement, gates.min_memory_cosine, gates.max_abs) == (0.5, 0.2, 3.0)
    _, builder = gpu
    folder = copy_export(encoder_export, tmp_path)
    drift(builder, tmp_path)  # a 1% weight change: over 1e-3, under a loosened bound
    manifest = build_engines(folder, EngineOptions(drift_segments=4, max_abs=10.0,
                                                   min_memory_cosine=0.5, min_agreement=0))
    assert manifest.validation["tensorrt"]["gates"]["max_abs"] == 10.0


def test_a_polygraphy_build_failure_is_one_line(gpu, tmp_path, encoder_export):
    from polygraphy.exception import PolygraphyException

    _, builder = gpu

    def fail(path):
        raise PolygraphyException("Invalid Engine.\nPlease ensure the engine was built")

    builder.plan_source = fail
    with pytest.raises(BackendError, match=r"^model.onnx: TensorRT could not build an engine "
                                           r"\(Invalid Engine. Please ensure"):
        build_engines(copy_export(encoder_export, tmp_path), EngineOptions(drift_segments=4))


def test_rmt_export_engine_fails_in_one_line_when_a_plan_drifts(gpu, tmp_path,
                                                                encoder_checkpoint):
    from rmt_deploy.cli import export_main

    _, builder = gpu
    drift(builder, tmp_path)
    out = tmp_path / "enc-export"
    result = CliRunner().invoke(export_main, [str(encoder_checkpoint), "-o", str(out),
                                              "--engine", "--drift-segments", "4", "-q"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "rmt-export: error: the TensorRT fp32 plans: closed loop error on")
    assert not list(out.glob("*.plan"))  # the validated ONNX export stays, without plans
    assert "tensorrt" not in read_manifest(out).validation
    builder.plan_source = lambda path: path
    result = CliRunner().invoke(export_main, [str(encoder_checkpoint), "-o", str(out),
                                              "--engine", "--drift-segments", "4", "-q"])
    assert result.exit_code == 0, result.output
    assert read_manifest(out).validation["tensorrt"]["segments"] == 4


def test_a_plan_recorded_for_another_gpu_is_refused_on_open(gpu, tmp_path, encoder_export):
    cuda, _ = gpu
    folder = copy_export(encoder_export, tmp_path)
    (folder / "model.plan").write_bytes(b"plan")
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["engines"] = {"step": {"file": "model.plan", "tensorrt": "10.13.0",
                                "sha256": hashlib.sha256(b"plan").hexdigest(),
                                "gpu": "NVIDIA A100", "compute_capability": "8.0"}}
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(BackendError, match="built for NVIDIA A100"):
        open_model(folder / "model.plan")  # the fake would fail on b"plan" if it got there


def test_an_int8_export_builds_its_qdq_graph(gpu, tmp_path, encoder_checkpoint):
    from rmt_deploy.export.pipeline import ExportOptions, export_checkpoint

    _, builder = gpu
    data = tmp_path / "calibration.npy"
    np.save(data, np.random.default_rng(0).integers(5, 45, (4, 200)))
    folder = export_checkpoint(encoder_checkpoint, tmp_path / "enc", ExportOptions(
        precision="int8", calibration=data, drift_segments=4, int8_policy="linear")).folder
    manifest = build_engines(folder, EngineOptions(drift_segments=4, min_agreement=0.5))
    assert [call["path"].rsplit("/", 1)[-1] for call in builder.networks] == [
        "model.int8.onnx", "write.int8.onnx"]
    record = manifest.engines["step"]
    assert record["precision"] == "int8" and record["source_graph"] == "model.int8.onnx"
    assert manifest.validation["tensorrt"]["precision"] == "int8"
