"""The TensorRT builder's calls, against a stand-in for the tensorrt module that records
them (TensorRT itself cannot be installed on the CPU machines)."""

import hashlib
import json
import shutil
import sys
import types

import pytest

from rmt_deploy.manifest import MANIFEST_NAME, read_manifest


class Recorder:
    def __init__(self):
        self.calls = []


def fake_tensorrt(recorder: Recorder) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.13.0"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 0

    class MemoryPoolType:
        WORKSPACE = "workspace"

    class Profile:
        def set_shape(self, name, low, opt, high):
            recorder.calls.append(("set_shape", name, low, opt, high))

    class Cache:
        def serialize(self):
            return b"timing-cache"

    class Config:
        def set_memory_pool_limit(self, pool, size):
            recorder.calls.append(("workspace", pool, size))

        def add_optimization_profile(self, profile):
            recorder.calls.append(("profile",))

        def create_timing_cache(self, data):
            recorder.calls.append(("timing_cache_in", data))
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            recorder.calls.append(("set_timing_cache", ignore_mismatch))

        def get_timing_cache(self):
            return Cache()

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            recorder.calls.append(("create_network", flags))
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"plan-bytes"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            recorder.calls.append(("parse", path.rsplit("/", 1)[-1]))
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            recorder.calls.append(("deserialize",))
            raise AssertionError("a mismatched plan must be refused before deserializing")

    for name, value in dict(Logger=Logger, Builder=Builder, OnnxParser=OnnxParser, Runtime=Runtime,
                            NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag,
                            MemoryPoolType=MemoryPoolType).items():
        setattr(trt, name, value)
    return trt


@pytest.fixture
def fake_gpu(monkeypatch):
    recorder = Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(recorder))
    from rmt_deploy.runtime.backends import _cuda

    monkeypatch.setattr(_cuda, "device_name_and_capability", lambda: ("NVIDIA H200", "9.0"))
    return recorder


def test_builds_fp16_plans_with_one_profile_and_records_them(fake_gpu, tmp_path,
                                                             decoder_checkpoint):
    from rmt_deploy.contract import BatchProfile
    from rmt_deploy.export.pipeline import ExportOptions, export_checkpoint
    from rmt_deploy.export.tensorrt_build import EngineOptions, build_engines

    folder = export_checkpoint(decoder_checkpoint, tmp_path / "dec",
                               ExportOptions(precision="fp16", drift_segments=4)).folder
    cache = tmp_path / "timing.cache"
    manifest = build_engines(folder, EngineOptions(BatchProfile(1, 2, 4), 512, cache,
                                                   max_new_tokens=8))
    parsed = [call[1] for call in fake_gpu.calls if call[0] == "parse"]
    assert parsed == ["model.fp16.onnx", "write.fp16.onnx", "generate.fp16.onnx"]
    assert ("create_network", 1) in fake_gpu.calls  # STRONGLY_TYPED
    assert ("workspace", "workspace", 512 << 20) in fake_gpu.calls
    shapes = [call for call in fake_gpu.calls if call[0] == "set_shape"]
    assert ("set_shape", "input_ids", (1, 1), (2, 5), (4, 5)) in shapes
    assert ("set_shape", "input_ids", (1, 1), (2, 5), (4, 13)) in shapes  # read plan
    assert ("set_shape", "memory_in", (1, 2, 32), (2, 2, 32), (4, 2, 32)) in shapes
    assert cache.read_bytes() == b"timing-cache"
    record = read_manifest(folder).engines["step"]
    assert record["file"] == "model.plan" and record["precision"] == "fp16"
    assert (record["tensorrt"], record["gpu"], record["compute_capability"]) == (
        "10.13.0", "NVIDIA H200", "9.0")
    assert (folder / "model.plan").read_bytes() == b"plan-bytes"
    assert manifest.engines["read"]["file"] == "generate.plan"
    assert manifest.engines["write"]["file"] == "write.plan"
    # a second build reuses the timing cache
    build_engines(folder, EngineOptions(timing_cache=cache))
    assert ("timing_cache_in", b"timing-cache") in fake_gpu.calls


def test_a_plan_recorded_for_another_gpu_is_refused_on_open(fake_gpu, tmp_path, encoder_export,
                                                            monkeypatch):
    from rmt_deploy.errors import BackendError
    from rmt_deploy.runtime import open_model
    from rmt_deploy.runtime.backends import _cuda

    folder = tmp_path / "exp"
    shutil.copytree(encoder_export, folder)
    (folder / "model.plan").write_bytes(b"plan")
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["engines"] = {"step": {"file": "model.plan", "tensorrt": "10.13.0",
                                "sha256": hashlib.sha256(b"plan").hexdigest(),
                                "gpu": "NVIDIA A100", "compute_capability": "8.0"}}
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    monkeypatch.setattr(_cuda, "device_name_and_capability", lambda: ("NVIDIA H200", "9.0"))
    with pytest.raises(BackendError, match="built for NVIDIA A100"):
        open_model(folder / "model.plan")
    assert ("deserialize",) not in fake_gpu.calls


def test_an_int8_export_builds_its_qdq_graph(fake_gpu, tmp_path, encoder_checkpoint):
    import numpy as np

    from rmt_deploy.export.pipeline import ExportOptions, export_checkpoint
    from rmt_deploy.export.tensorrt_build import build_engines

    data = tmp_path / "calibration.npy"
    np.save(data, np.random.default_rng(0).integers(5, 45, (4, 200)))
    folder = export_checkpoint(encoder_checkpoint, tmp_path / "enc", ExportOptions(
        precision="int8", calibration=data, drift_segments=4, int8_policy="linear")).folder
    manifest = build_engines(folder)
    assert [call[1] for call in fake_gpu.calls if call[0] == "parse"] == [
        "model.int8.onnx", "write.int8.onnx"]
    record = manifest.engines["step"]
    assert record["precision"] == "int8" and record["source_graph"] == "model.int8.onnx"
