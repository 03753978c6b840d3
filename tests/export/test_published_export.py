"""``rmt-export`` of the published Llama checkpoints with peft LoRA: the plain RMT through
the decoder path, the ARMT through its own; the manifest says LoRA was merged."""

import numpy as np
import onnx
import torch
from click.testing import CliRunner
from conftest import write_gpt2_folder
from generation_reference import GREEDY, memory_before, reference_generation
from published_layouts import ALPHA, RANK, export_published, write_llama_base, write_published

from rmt_deploy.cli import export_main
from rmt_deploy.manifest import read_manifest
from rmt_deploy.model.armt import generate_armt, run_armt
from rmt_deploy.model.checkpoint import AuthorsOptions, load_checkpoint
from rmt_deploy.model.loop import run_decoder
from rmt_deploy.runtime import open_model
from rmt_deploy.runtime.options import RuntimeOptions

torch.set_num_threads(1)


def test_export_merges_lora_and_records_it(tmp_path):
    """The published plain RMT on Llama with LoRA: the export says the merge, and
    rmt-run's perplexity and greedy ids on ONNX Runtime and OpenVINO equal the reference
    model's, loaded from the same file."""
    published = write_published(tmp_path / "ckpt", armt=False, config={"segment_size": 6})
    base = write_gpt2_folder(tmp_path / "base", "llama")
    result = export_published(published.path, base)
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "ckpt" / "model-export")
    assert manifest.source["format"] == "authors-gpt2"
    assert manifest.source["lora"] == {"merged": True, "rank": RANK, "alpha": ALPHA,
                                       "modules": 4}
    assert manifest.config.segment_size == 6 and manifest.config.num_mem_tokens == 3
    reference = load_checkpoint(published.path, AuthorsOptions(
        base_model=base, lora_alpha=ALPHA)).rmt
    ids = [(5 * i + 2) % 50 for i in range(40)]  # 7 segments, the last short
    logits = run_decoder(reference, [ids]).logits[0]
    log_probs = torch.log_softmax(logits[:-1].double(), -1)
    expected = float(torch.exp(-log_probs[torch.arange(39), torch.tensor(ids[1:])].mean()))
    expected_ids, _ = reference_generation(reference, ids, memory_before(reference, ids),
                                           GREEDY)
    for backend in ("onnxruntime", "openvino"):
        model = open_model(tmp_path / "ckpt" / "model-export",
                           RuntimeOptions(backend=backend, threads=1))
        assert abs(model.run_one(np.array(ids)).perplexity - expected) <= 1e-4 * expected
        assert model.run_one(np.array(ids), generate=GREEDY).generated_ids == expected_ids


def test_published_armt_exports_and_runs_as_the_reference(tmp_path):
    """The published ARMT (shared naming, LoRA, no correction): rmt-export validates it,
    and rmt-run's perplexity and greedy ids on ONNX Runtime and OpenVINO equal the
    reference model's, loaded from the same file."""
    published = write_published(tmp_path / "ckpt", naming="shared", config={"segment_size": 6})
    base = write_llama_base(tmp_path / "base")
    out = tmp_path / "export"
    result = export_published(published.path, base, "--no-armt-correction", "-o", str(out))
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest.source["format"] == "authors-armt" and manifest.source["lora"]["merged"]
    assert manifest.config.variant == "armt" and not manifest.config.correction
    reference = load_checkpoint(published.path, AuthorsOptions(
        base_model=base, lora_alpha=ALPHA, armt_correction=False)).rmt
    ids = [(5 * i + 2) % 50 for i in range(40)]  # 7 segments, the last short
    logits, _ = run_armt(reference, ids)
    log_probs = torch.log_softmax(logits[:-1].double(), -1)
    expected = float(torch.exp(-log_probs[torch.arange(39), torch.tensor(ids[1:])].mean()))
    expected_ids = generate_armt(reference, ids, 6)
    for backend in ("onnxruntime", "openvino"):
        model = open_model(out, RuntimeOptions(backend=backend, threads=1))
        document = np.array(ids)
        assert abs(model.run_one(document).perplexity - expected) <= 1e-4 * expected
        assert model.run_one(document, generate=6).generated_ids == expected_ids


def test_armt_fp16_keeps_the_state_arithmetic_in_fp32(tmp_path):
    """--precision fp16 of an ARMT as published (no correction): the layers' matmuls run in
    FP16, every matmul on the state (reads, outer products, running sums: the fp32_state
    modules) in FP32, nothing on the way between them is rounded to FP16 (the state
    inputs feed FP32 nodes directly), and the export's closed-loop gates pass."""
    published = write_published(tmp_path / "ckpt", naming="shared", config={"segment_size": 6})
    out = tmp_path / "export"
    result = CliRunner().invoke(export_main, [
        str(published.path), "--base-model", str(write_llama_base(tmp_path / "base")),
        "--lora-alpha", str(ALPHA), "--no-armt-correction", "--precision", "fp16",
        "--drift-segments", "40",
        "--validation-segments", "3", "--threads", "1", "-q", "-o", str(out)])
    assert result.exit_code == 0, result.output
    graph = onnx.shape_inference.infer_shapes(
        onnx.load(out / "write.fp16.onnx", load_external_data=False)).graph
    types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
    matmuls = [(node.name, types[node.output[0]]) for node in graph.node
               if node.op_type == "MatMul"]
    state = [kind for name, kind in matmuls if "/fp32_state" in name]
    assert len(state) == 10 and set(state) == {onnx.TensorProto.FLOAT}  # 2 layers x 5
    assert onnx.TensorProto.FLOAT16 in {kind for name, kind in matmuls}
    produced = {output: node for node in graph.node for output in node.output}
    for node in graph.node:
        if "/fp32_state" in node.name:
            for name in node.input:
                source = produced.get(name)
                assert source is None or source.op_type != "Cast" or "/fp32_state" in \
                    source.name or types.get(source.input[0]) != onnx.TensorProto.FLOAT16, \
                    f"{node.name} reads {name}, rounded through FP16"
    readers = {name for node in graph.node if "/fp32_state" in node.name for name in node.input}
    assert {"A.0", "z.0", "A.1", "z.1"} <= readers


def test_the_validation_engines_map_the_staged_weights_once(tmp_path, monkeypatch):
    """A large model's export validates its FP32 and FP16 graphs on engines that map the
    staged weights file once for all their sessions, as rmt-run does (each session
    reading its own copy held a 1B model's weights four times over and ran out of
    memory); the export passes as before."""
    from rmt_deploy.runtime.backends import onnxruntime as backend

    monkeypatch.setattr(backend, "SHARED_WEIGHTS_BYTES", 0)  # "large": even this file
    engines = []
    opened = backend.OnnxRuntimeEngine.__init__

    def spy(self, *args, **kwargs):
        opened(self, *args, **kwargs)
        engines.append(self)

    monkeypatch.setattr(backend.OnnxRuntimeEngine, "__init__", spy)
    published = write_published(tmp_path / "ckpt", naming="shared", config={"segment_size": 6})
    result = CliRunner().invoke(export_main, [
        str(published.path), "--base-model", str(write_llama_base(tmp_path / "base")),
        "--lora-alpha", str(ALPHA), "--no-armt-correction", "--precision", "fp16",
        "--drift-segments", "20", "--validation-segments", "3", "--threads", "1", "-q",
        "-o", str(tmp_path / "export")])
    assert result.exit_code == 0, result.output
    assert [engine.precision for engine in engines] == ["fp32", "fp16"]
    assert all(engine._weights for engine in engines)
