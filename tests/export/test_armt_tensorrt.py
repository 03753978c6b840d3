"""TensorRT plans of an ARMT, against the stand-in for TensorRT and CUDA
(tests/fake_tensorrt.py: Polygraphy's loaders recorded, a plan "built" from the parsed
graph and run with ONNX Runtime on the addresses the backend binds): every graph of the
export is built with every state pair (A.i, z.i, started, the sliding window) in its
profile and in FP32, also in FP16 plans; the closed-loop gate judges the state pairs, so
a plan that writes one pair wrong is refused and the folder is left as it was; the plans
run perplexity, greedy generation and sessions as the PyTorch reference does."""

import hashlib
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from fake_tensorrt import install_fake_gpu
from graph_faults import damaged_output, half_state
from published_layouts import ALPHA, export_published, write_llama_base, write_published

from rmt_deploy.contract import (
    DECODE,
    PREFILL,
    STEP,
    WINDOW_IN,
    WINDOW_MASK_IN,
    WRITE,
    BatchProfile,
    profile_shapes,
    state_pairs,
    variant,
    variant_names,
)
from rmt_deploy.errors import BackendError, ValidationError
from rmt_deploy.export.tensorrt_build import EngineOptions, build_engines
from rmt_deploy.manifest import read_manifest
from rmt_deploy.model.armt import generate_armt, run_armt
from rmt_deploy.model.checkpoint import AuthorsOptions, load_checkpoint
from rmt_deploy.runtime import open_model
from rmt_deploy.runtime.state import pack, unpack

torch.set_num_threads(1)

IDS = np.array([(5 * i + 2) % 50 for i in range(40)])  # 7 segments of 6, the last short
OPTIONS = EngineOptions(BatchProfile(1, 2, 4), max_new_tokens=8, drift_segments=8, threads=1)


@pytest.fixture
def gpu(monkeypatch):
    return install_fake_gpu(monkeypatch)


def folder_state(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def armt_state_names(config, graph):
    """The ARMT state (not the KV cache) that ``graph`` takes and returns."""
    contract = variant(config, graph)
    carried = {p.name_in for p in state_pairs(config)}
    return ({p.name_in for p in contract.reads if p.name_in in carried}
            | {p.name_out for p in contract.writes if p.name_in in carried})


def plan_dtypes(folder, graph):
    """The dtype of every input and output of ``graph``'s kept plan, as TensorRT's
    deserialized engine reports it (the fake: the ONNX Runtime type of the graph the plan
    was built from)."""
    import tensorrt as trt  # the fake, installed by the test

    manifest = read_manifest(folder)
    engine = trt.Runtime(None).deserialize_cuda_engine(
        manifest.read_bytes(manifest.engines[graph]["file"]))
    return {engine.get_tensor_name(i): engine.get_tensor_dtype(engine.get_tensor_name(i))
            for i in range(engine.num_io_tensors)}


def perplexity(logits: torch.Tensor, ids: np.ndarray) -> float:
    log_probs = torch.log_softmax(logits[:-1].double(), -1)
    return float(torch.exp(-log_probs[torch.arange(len(ids) - 1),
                                      torch.from_numpy(ids[1:])].mean()))


def published_reference(export, sliding_window=False):
    """The conftest ARMT's reference, loaded from the published file it was exported from."""
    root = export.parent
    return load_checkpoint(root / "ckpt" / "model.safetensors", AuthorsOptions(
        base_model=root / "base", lora_alpha=ALPHA, armt_correction=False,
        sliding_window=sliding_window)).rmt


@pytest.fixture(scope="module")
def fp32_plans(armt_export, tmp_path_factory):
    """The published ARMT's FP32 plans, built once; the builder's records beside them."""
    folder = shutil.copytree(armt_export, tmp_path_factory.mktemp("armt-trt") / "export")
    with pytest.MonkeyPatch.context() as patch:
        _, builder = install_fake_gpu(patch)
        build_engines(folder, OPTIONS)
    return folder, builder


@pytest.fixture(scope="module")
def window_plans(tmp_path_factory):
    """The published ARMT exported with --sliding-window (no correction), its FP32 plans
    built, and the reference loaded from the same file."""
    root = tmp_path_factory.mktemp("armt-window-trt")
    published = write_published(root / "ckpt", naming="shared", config={"segment_size": 6})
    base = write_llama_base(root / "base")
    out = root / "export"
    result = export_published(published.path, base, "--sliding-window",
                              "--no-armt-correction", "-o", str(out))
    assert result.exit_code == 0, result.output
    with pytest.MonkeyPatch.context() as patch:
        install_fake_gpu(patch)
        build_engines(out, OPTIONS)
    return out, published_reference(out, sliding_window=True)


def test_every_graph_of_an_armt_is_built_with_its_state_pairs_in_the_profile(gpu, fp32_plans):
    folder, builder = fp32_plans
    manifest = read_manifest(folder)
    config = manifest.config
    assert [call["path"].rsplit("/", 1)[-1] for call in builder.networks] == [
        "model.onnx", "write.onnx", "prefill.onnx", "decode.onnx"]
    assert all(call["strongly_typed"] is True for call in builder.networks)
    assert set(manifest.engines) == {STEP, WRITE, PREFILL, DECODE}
    for graph, config_call in zip(variant_names(config), builder.configs, strict=True):
        (profile,) = config_call["profiles"]
        shapes = {name: (s.min, s.opt, s.max) for name, s in profile.items()}
        assert shapes == profile_shapes(config, graph, BatchProfile(1, 2, 4), 8)
        for pair in variant(config, graph).reads:
            if pair in state_pairs(config):  # batch 1..4, the rest as declared
                assert shapes[pair.name_in] == tuple((b, *pair.row_shape) for b in (1, 2, 4))
        # every (A, z) and started the graph takes or returns is FP32 in the plan
        dtypes = plan_dtypes(folder, graph)
        names = armt_state_names(config, graph)
        assert {"A.0", "z.1", "started"} <= names
        assert {dtypes[name] for name in names} == {"tensor(float)"}


def test_the_plans_are_judged_on_every_state_pair_closed_loop(fp32_plans):
    folder, _ = fp32_plans
    check = read_manifest(folder).validation["tensorrt"]
    assert check["precision"] == "fp32" and check["segments"] == 8
    errors = check["closed_loop"]["max_abs"]
    config = read_manifest(folder).config
    outputs = {pair.name_out for pair in state_pairs(config)}
    assert outputs == {"A_out.0", "z_out.0", "A_out.1", "z_out.1", "started_out"}
    assert outputs | {"write_" + name for name in outputs} | {"logits"} <= set(errors)
    assert check["closed_loop"]["agreement"] == 1.0
    # the prefill and decode plans generated after the validation documents, as FP32
    generation = check["generation"]
    assert generation["generated_same"] == 1.0 and generation["rows"] == 4
    assert set(generation["max_abs"]) == {"prefill_logits", "decode_logits"}
    assert max(generation["max_abs"].values()) < 1e-4


@pytest.mark.parametrize("graph, output", [("write.onnx", "A_out.1"),
                                           ("write.onnx", "z_out.0"),
                                           ("model.onnx", "started_out")])
def test_a_plan_that_writes_a_state_pair_wrong_is_refused_and_the_folder_kept(
        gpu, armt_export, tmp_path, graph, output):
    """The write plan's outputs are the state only: a write plan whose A or z is written
    1% off (no logits touched) fails the gate on that layer's state; a step plan that
    marks no segment as read (``started_out`` 0: every segment read as a first one) is
    refused too. No plan is kept, the folder is as it was."""
    _, builder = gpu
    folder = shutil.copytree(armt_export, tmp_path / "exp")
    before = folder_state(folder)
    scale = 0.0 if output == "started_out" else 1.01

    def source(path):
        if not path.endswith(graph):
            return path
        return str(damaged_output(path, tmp_path / f"damaged-{len(builder.builds)}.onnx",
                                  output, scale))

    builder.plan_source = source
    layer = output[-1]
    named = {"write.onnx": rf"write_[Az]_out[.]{layer}",  # the pair, or the A it feeds
             "model.onnx": r"(logits|started_out)"}[graph]  # the logits follow at once
    with pytest.raises(ValidationError, match=rf"^the TensorRT fp32 plans: closed loop "
                                              rf"(error on|memory cosine of) {named} .*the "
                                              rf"plans were not kept"):
        build_engines(folder, OPTIONS)
    assert folder_state(folder) == before


def test_a_plan_whose_state_pair_is_not_fp32_is_refused(gpu, armt_export, tmp_path):
    """A write plan whose network types z.1 (and z_out.1) FP16 at its boundary: refused
    before it runs, naming the pair, and not kept."""
    _, builder = gpu
    folder = shutil.copytree(armt_export, tmp_path / "exp")
    before = folder_state(folder)
    builder.plan_source = lambda path: str(
        half_state(path, tmp_path / "half-write.onnx", "z.1") if path.endswith("/write.onnx")
        else path)
    with pytest.raises(BackendError, match=r"input z[.]1 is float16 .* the manifest "
                                           r"declares float32"):
        build_engines(folder, OPTIONS)
    assert folder_state(folder) == before


@pytest.mark.parametrize("graph", ["prefill.onnx", "decode.onnx"])
def test_a_generation_plan_that_drifts_is_refused_and_the_folder_kept(
        gpu, armt_export, tmp_path, graph):
    """The prefill and decode plans, which no segment step runs, are judged by greedy
    generation after the validation documents: one whose logits are 10% off (the same
    greedy tokens) is refused."""
    _, builder = gpu
    folder = shutil.copytree(armt_export, tmp_path / "exp")
    before = folder_state(folder)

    def source(path):
        if not path.endswith("/" + graph):
            return path
        return str(damaged_output(path, tmp_path / f"damaged-{graph}", "logits", 1.1))

    builder.plan_source = source
    name = graph.split(".")[0]
    with pytest.raises(ValidationError, match=rf"^the TensorRT fp32 plans: generation error "
                                              rf"on {name}_logits is .*, above the "
                                              rf"tolerance 0.001; the plans were not kept"):
        build_engines(folder, OPTIONS)
    assert folder_state(folder) == before


def test_the_plans_run_perplexity_and_greedy_ids_as_the_reference(gpu, fp32_plans,
                                                                   armt_export):
    folder, _ = fp32_plans
    reference = published_reference(armt_export)
    expected = perplexity(run_armt(reference, IDS)[0], IDS)
    expected_ids = generate_armt(reference, IDS, 6)
    for cuda_graphs in (False, True):
        model = open_model(folder / "model.plan", cuda_graphs=cuda_graphs)
        assert model.engine.name == "tensorrt"
        assert model.run_one(IDS).perplexity == pytest.approx(expected, rel=1e-5)
        assert model.run_one(IDS, generate=6).generated_ids == expected_ids
    cuda, builder = gpu
    assert cuda.leaks() == {}
    assert builder.trt.unset == []  # every launch had every tensor bound


def test_rmt_run_on_the_plan_answers_as_on_onnx_runtime(gpu, fp32_plans, tmp_path):
    """rmt-run MODEL/model.plan: perplexity and generated ids on the TensorRT backend
    equal rmt-run's on ONNX Runtime (whose equal the reference's, above and in
    test_published_export.py)."""
    import json

    from rmt_deploy.cli import run_main

    folder, _ = fp32_plans
    story = tmp_path / "story.txt"
    story.write_text("the quick brown fox jumps over the lazy dog and runs far away")
    reports = {}
    for backend in ("tensorrt", "onnxruntime"):
        for extra in ((), ("--generate", "5")):
            target = folder / "model.plan" if backend == "tensorrt" else folder
            result = CliRunner().invoke(run_main, [str(target), str(story), "--json",
                                                   "--backend", backend, "--threads", "1",
                                                   *extra])
            assert result.exit_code == 0, result.output
            reports[backend, bool(extra)] = json.loads(result.stdout)
    assert reports["tensorrt", False]["backend"] == "tensorrt"
    assert reports["tensorrt", False]["perplexity"] == pytest.approx(
        reports["onnxruntime", False]["perplexity"], rel=1e-5)
    assert reports["tensorrt", True]["generated_ids"] == reports[
        "onnxruntime", True]["generated_ids"]
    assert len(reports["tensorrt", True]["generated_ids"]) == 5


def test_a_session_saves_and_restores_every_pair_on_the_plans(gpu, fp32_plans):
    """A session fed on the plans, saved and restored there, ends as one fed whole; a
    state saved on ONNX Runtime restores on the plans (one state file for every
    backend)."""
    folder, _ = fp32_plans
    model = open_model(folder / "model.plan")
    whole = model.session()
    whole.feed(IDS)
    session = model.session()
    session.feed(IDS[:15])
    saved = session.save()
    session.close()  # its TensorRT buffers freed while the fake CUDA is installed
    header, arrays = unpack(saved)
    assert arrays["state/started"].tolist() == [[1.0]] and np.abs(arrays["state/A.1"]).max() > 0
    restored = model.restore_session(saved)
    restored.feed(IDS[15:])
    got, expected = unpack(restored.save())[1], unpack(whole.save())[1]
    for pair in state_pairs(model.config):
        np.testing.assert_allclose(got["state/" + pair.name_in],
                                   expected["state/" + pair.name_in], rtol=1e-5, atol=1e-5)
    result, whole_result = restored.close(), whole.close()
    assert result.perplexity == pytest.approx(whole_result.perplexity, rel=1e-5)
    onnxruntime = open_model(folder, backend="onnxruntime", threads=1).session()
    onnxruntime.feed(IDS[:15])
    moved = model.restore_session(onnxruntime.save())
    onnxruntime.close()
    moved.feed(IDS[15:])
    assert moved.close().perplexity == pytest.approx(whole_result.perplexity, rel=1e-5)


def test_sliding_window_plans_carry_the_window_in_fp32_and_run_as_the_reference(
        gpu, window_plans):
    """The window and its mask are FP32 state of the step and write plans (not of
    prefill and decode); the plans were judged on them closed loop; perplexity (with the
    window), greedy ids (the context read without it, as the authors' generate) and a
    session's saved window equal the reference's and ONNX Runtime's."""
    folder, reference = window_plans
    manifest = read_manifest(folder)
    config = manifest.config
    errors = manifest.validation["tensorrt"]["closed_loop"]["max_abs"]
    assert {"window_out", "window_mask_out", "write_window_out",
            "write_window_mask_out"} <= set(errors)
    for graph in (STEP, WRITE, PREFILL, DECODE):
        dtypes = plan_dtypes(folder, graph)
        carries = graph in (STEP, WRITE)
        assert (WINDOW_IN in dtypes and "window_mask_out" in dtypes) == carries
        assert {dtypes[name] for name in armt_state_names(config, graph)} == {"tensor(float)"}
    model = open_model(folder / "model.plan")
    assert model.run_one(IDS).perplexity == pytest.approx(
        perplexity(run_armt(reference, IDS)[0], IDS), rel=1e-5)
    assert model.run_one(IDS, generate=6).generated_ids == generate_armt(reference, IDS, 6)
    session = model.session()
    session.feed(IDS[:15])
    header, arrays = unpack(session.save())
    session.close()
    assert arrays["state/" + WINDOW_MASK_IN].max() == 1
    onnxruntime = open_model(folder, backend="onnxruntime", threads=1).session()
    onnxruntime.feed(IDS[:15])
    expected = unpack(onnxruntime.save())[1]
    for name in (WINDOW_IN, WINDOW_MASK_IN, "A.1"):
        np.testing.assert_allclose(arrays["state/" + name], expected["state/" + name],
                                   rtol=1e-5, atol=1e-5)
    restored = model.restore_session(pack(header, arrays))
    restored.feed(IDS[15:])
    onnxruntime.feed(IDS[15:])
    assert restored.close().perplexity == pytest.approx(onnxruntime.close().perplexity,
                                                        rel=1e-5)


@pytest.mark.parametrize("window", [(), ("--sliding-window", "--min-agreement", "0.7")],
                         ids=["plain", "window"])
def test_fp16_plans_keep_every_state_pair_fp32(gpu, armt_export, tmp_path, window):
    """rmt-export --precision fp16 --engine of the published ARMT, with and without the
    sliding window: the plans are built from the FP16 graphs (FP16 weights in the
    layers), every state pair of every plan is FP32, (A, z) and started feed FP32 nodes
    (the window holds keys and values the FP16 layers read and write), and the plans pass
    the FP16 gates on every pair against the FP32 graph. (The tiny random fixture's FP16
    layers with the window generate other tokens than FP32 in 1 of the 4 validation
    rows, so that export asks for 70% agreement.)"""
    _, builder = gpu
    root = armt_export.parent
    out = tmp_path / "export"
    result = export_published(root / "ckpt" / "model.safetensors", root / "base", *window,
                              "--no-armt-correction", "--precision", "fp16",
                              "--drift-segments", "8", "--engine", "--batch", "1,2,4",
                              "--max-new-tokens", "8", "-o", str(out))
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    config = manifest.config
    assert [call["path"].rsplit("/", 1)[-1] for call in builder.networks] == [
        "model.fp16.onnx", "write.fp16.onnx", "prefill.fp16.onnx", "decode.fp16.onnx"]
    for graph in variant_names(config):
        record = manifest.engines[graph]
        assert record["precision"] == "fp16"
        model = onnx.load(str(out / record["source_graph"]), load_external_data=False)
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
        names = armt_state_names(config, graph)
        dtypes = plan_dtypes(out, graph)
        assert {dtypes[name] for name in names} == {"tensor(float)"}
        # the state inputs feed FP32 nodes directly: no Cast to FP16 reads them
        casts = {node.input[0] for node in model.graph.node if node.op_type == "Cast"
                 and onnx.helper.get_attribute_value(node.attribute[0])
                 == onnx.TensorProto.FLOAT16}
        assert not casts & {name for name in names if not name.startswith(WINDOW_IN)}, graph
        assert (WINDOW_IN in names) == (bool(window) and graph in (STEP, WRITE))
    check = manifest.validation["tensorrt"]
    assert check["precision"] == "fp16"
    outputs = {pair.name_out for pair in state_pairs(config)}
    assert outputs | {"write_" + name for name in outputs} <= set(
        check["closed_loop"]["max_abs"])
    assert check["generation"]["generated_same"] >= (0.7 if window else 0.99)


def test_plans_of_a_profile_below_three_rows_are_judged_and_run_any_number_of_documents(
        gpu, armt_export, tmp_path):
    """Plans for at most 2 rows (--batch 1,1,2): the closed-loop judgement's batch of 3
    documents runs in parts the plans take, and so do 3 documents' steps and generation
    on them; each document gets what it gets on ONNX Runtime."""
    folder = shutil.copytree(armt_export, tmp_path / "exp")
    manifest = build_engines(folder, EngineOptions(BatchProfile(1, 1, 2), max_new_tokens=8,
                                                   drift_segments=6, threads=1))
    assert manifest.validation["tensorrt"]["batches"] == [3, 1]
    model = open_model(folder / "model.plan")
    assert model.engine.max_batch == 2
    documents = [IDS, IDS[::-1].copy(), IDS[5:22]]
    expected = open_model(folder, backend="onnxruntime", threads=1)
    got, want = model.run(documents), expected.run(documents)
    assert [o.perplexity for o in got.outputs] == pytest.approx(
        [o.perplexity for o in want.outputs], rel=1e-5)
    got, want = model.run(documents, 6), expected.run(documents, 6)
    assert [o.generated_ids for o in got.outputs] == [o.generated_ids for o in want.outputs]


def test_rmt_compare_and_a_triton_repository_take_the_plans(gpu, fp32_plans, tmp_path):
    """rmt-compare of the export against its model.plan compares every state pair open
    and closed loop and passes; rmt-triton --backend tensorrt serves the step plan with
    every pair as FP32 sequence state starting at zeros."""
    text_format = pytest.importorskip("google.protobuf.text_format")
    pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from rmt_deploy.cli import compare_main
    from rmt_deploy.serving.cli import triton_main

    folder, _ = fp32_plans
    result = CliRunner().invoke(compare_main, [str(folder), str(folder / "model.plan"),
                                               "--segments", "4", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "candidate: model.plan (tensorrt fp32)" in result.output
    compared = {line.split()[0] for line in result.output.splitlines()
                if line.startswith("  ")}
    config = read_manifest(folder).config
    outputs = {pair.name_out for pair in state_pairs(config)}
    assert outputs | {"write_" + name for name in outputs} <= compared
    result = CliRunner().invoke(triton_main, [str(tmp_path), "--model", str(folder),
                                              "--backend", "tensorrt", "--max-batch-size",
                                              "4"])
    assert result.exit_code == 0, result.output
    served = text_format.Parse((tmp_path / "rmt" / "config.pbtxt").read_text(),
                               pb2.ModelConfig())
    assert served.backend == "tensorrt"
    states = {s.input_name: (s.output_name, s.data_type, s.initial_state[0].zero_data)
              for s in served.sequence_batching.state}
    assert states == {pair.name_in: (pair.name_out, pb2.TYPE_FP32, True)
                      for pair in state_pairs(config)}
    assert (tmp_path / "rmt" / "1" / "model.plan").read_bytes() == (
        folder / "model.plan").read_bytes()
