"""The TensorRT backend's loop on CPU, against a stand-in for TensorRT and CUDA that runs
each plan's ONNX graph with ONNX Runtime on the addresses the backend binds
(tests/fake_tensorrt.py): results equal ONNX Runtime's, the memory buffers swap every
step, CUDA graphs are captured once per (shape, parity) and replayed, and every
allocation is freed when its state closes."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from engines import CountingEngine
from fake_tensorrt import FakeCuda, fake_tensorrt, plan_bytes
from generation_reference import check_backend_generation

from rmt_deploy.contract import BatchProfile, profile_shapes, variants
from rmt_deploy.errors import BackendError
from rmt_deploy.files import sha256_file
from rmt_deploy.manifest import MANIFEST_NAME, read_manifest
from rmt_deploy.model.checkpoint import load_checkpoint
from rmt_deploy.runtime import SessionPool, open_model
from rmt_deploy.runtime.backends import _cuda
from rmt_deploy.runtime.model import RMTModel


@pytest.fixture
def cuda(monkeypatch):
    fake = FakeCuda()
    monkeypatch.setattr(_cuda, "cudart", lambda: fake)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(fake))
    return fake


def with_plans(export, folder):
    """A copy of ``export`` with a fake plan for each of its graphs."""
    shutil.copytree(export, folder)
    manifest = read_manifest(folder)
    data = json.loads((folder / MANIFEST_NAME).read_text())
    for name, variant in variants(manifest.config).items():
        (folder / variant.plan_file).write_bytes(plan_bytes(folder / variant.file))
        profile = profile_shapes(manifest.config, name, BatchProfile(1, 4, 8), 16)
        data["engines"][name] = {
            "file": variant.plan_file, "sha256": sha256_file(folder / variant.plan_file),
            "precision": "fp32", "source_graph": variant.file, "tensorrt": "10.13.0",
            "gpu": "Fake GPU", "compute_capability": "9.0",
            "profile": {tensor: [list(shape) for shape in shapes]
                        for tensor, shapes in profile.items()}}
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    return folder


def documents(model, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(5, 45, n) for n in lengths]


@pytest.mark.parametrize("graphs", [False, True])
def test_tensorrt_runs_equal_onnxruntime(cuda, tmp_path, encoder_export, memory_decoder_export,
                                         graphs):
    for export in (encoder_export, memory_decoder_export):
        folder = with_plans(export, tmp_path / export.name)
        reference = open_model(folder, backend="onnxruntime")
        candidate = open_model(folder, backend="tensorrt", cuda_graphs=graphs)
        docs = documents(reference, (3, 47, 130))
        generate = 0 if reference.config.is_encoder else 4
        expected = reference.run(docs, generate=generate).outputs
        for got, want in zip(candidate.run(docs, generate=generate).outputs, expected,
                             strict=True):
            np.testing.assert_array_equal(got.memory, want.memory)
            if reference.config.is_encoder:
                np.testing.assert_array_equal(got.logits, want.logits)
            else:
                assert got.perplexity == want.perplexity
                assert got.generated_ids == want.generated_ids
    assert cuda.leaks() == {}


@pytest.mark.parametrize("graphs", [False, True])
def test_prefill_and_decode_after_odd_and_even_steps_equal_the_reference(
        cuda, tmp_path, memory_decoder_export, memory_decoder_checkpoint, graphs):
    model = open_model(with_plans(memory_decoder_export, tmp_path / "memdec"),
                       backend="tensorrt", cuda_graphs=graphs)
    check_backend_generation(model.engine, model.initial_state,
                             load_checkpoint(memory_decoder_checkpoint).rmt)


def test_cuda_graphs_are_captured_once_per_shape_and_parity(cuda, tmp_path, encoder_export):
    model = open_model(with_plans(encoder_export, tmp_path / "enc"), backend="tensorrt",
                       cuda_graphs=True)
    output = model.run_one(documents(model, (1000 * model.config.segment_size,))[0])
    assert output.segments == 1000
    # the write plan at both memory buffer parities, the step plan for the last segment
    assert cuda.counts["graph exec"] == 3
    assert cuda.counts["replays"] == 1000 - 3
    assert cuda.leaks() == {}


def test_every_allocation_is_freed_when_its_state_closes(cuda, tmp_path, encoder_export):
    model = open_model(with_plans(encoder_export, tmp_path / "enc"), backend="tensorrt",
                       cuda_graphs=True)
    size = model.config.segment_size
    session = model.session()
    session.feed(documents(model, (20 * size,))[0])
    assert cuda.leaks()["device"] > 0  # the session's states hold their buffers
    session.close()
    assert cuda.leaks() == {}
    with SessionPool(model) as pool:
        ids = [pool.open() for _ in range(3)]
        for session_id in ids:
            pool.feed(session_id, documents(model, (7 * size,), seed=1)[0])
        pool.close(ids[0])
    assert cuda.leaks() == {}
    dropped = model.session(total_tokens=5 * size)
    dropped.feed(documents(model, (5 * size,))[0])
    del dropped  # never closed: the finalizer frees it
    assert cuda.leaks() == {}


def test_device_memory_stays_flat_over_10000_segments(cuda, tmp_path, encoder_export):
    model = open_model(with_plans(encoder_export, tmp_path / "enc"), backend="tensorrt")
    size = model.config.segment_size
    with model.session(total_tokens=10_000 * size) as session:
        peaks = []
        for _ in range(10):
            session.feed(documents(model, (1000 * size,))[0])
            peaks.append(cuda.counts["device"])
        assert len(set(peaks)) == 1  # nothing allocated after the first 1,000 segments
        assert session.tokens == 10_000 * size
    assert cuda.leaks() == {}


@pytest.mark.parametrize(("call", "says"), [
    ("set_input_shape", "outside the plan's profile"),
    ("set_tensor_address", "refused the address"),
    ("execute_async_v3", "failed to run the step"),
])
def test_a_tensorrt_call_that_reports_failure_is_an_error(cuda, tmp_path, encoder_export,
                                                         call, says):
    model = open_model(with_plans(encoder_export, tmp_path / "enc"), backend="tensorrt")
    sys.modules["tensorrt"].failing.add(call)
    with pytest.raises(BackendError, match=says):
        model.run_one(documents(model, (20,))[0])
    assert cuda.leaks() == {}


def test_a_batch_outside_the_plans_profile_is_refused_or_split(cuda, tmp_path,
                                                               encoder_export):
    """An engine state of more rows than the profile takes is refused, naming the limit;
    the stepper splits a step of more rows into steps the plans take."""
    model = open_model(with_plans(encoder_export, tmp_path / "enc"), backend="tensorrt")
    assert model.engine.max_batch == 8
    state = {k: np.stack([v] * 9) for k, v in model.initial_state.items()}
    with pytest.raises(BackendError, match=r"9 rows is outside .* batch profile 1\.\.8"):
        model.engine.new_state(state)
    counting = CountingEngine(model.engine)
    docs = documents(model, (20, 35, 7, 60, 20, 3, 44, 20, 9, 11))
    outputs = RMTModel(counting, model.initial_state).run(docs).outputs
    assert max(counting.batches) == 8 and len(counting.batches) > 0
    expected = open_model(encoder_export, backend="onnxruntime").run(docs).outputs
    for got, want in zip(outputs, expected, strict=True):
        np.testing.assert_allclose(got.logits, want.logits, atol=1e-5)
    assert cuda.leaks() == {}
