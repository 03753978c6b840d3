"""``rmt-export`` of the published Llama checkpoints with peft LoRA: the plain RMT through
the decoder path, the ARMT through its own; the manifest says LoRA was merged. The plain
Llama RMT's memory matters, and its sessions and session pool answer as rmt-run."""

import json
import threading

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import write_gpt2_folder
from generation_reference import GREEDY, memory_before, reference_generation
from published_layouts import ALPHA, RANK, export_published, write_llama_base, write_published

from rmt_deploy.cli import export_main, run_main
from rmt_deploy.manifest import read_manifest
from rmt_deploy.model.armt import generate_armt, run_armt
from rmt_deploy.model.checkpoint import AuthorsOptions, load_checkpoint
from rmt_deploy.model.loop import run_decoder
from rmt_deploy.runtime import open_model
from rmt_deploy.runtime.options import RuntimeOptions
from rmt_deploy.runtime.pool import SessionPool
from rmt_deploy.runtime.stepper import Stepper
from rmt_deploy.segmentation import segment_bounds

torch.set_num_threads(1)

LLAMA_DOC = np.array([(7 * i + 3) % 52 for i in range(28)])  # 5 segments of 6, the last short


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


@torch.no_grad()
def reference_perplexity(rmt, ids) -> float:
    logits = run_decoder(rmt, [list(ids)]).logits[0]
    log_probs = torch.log_softmax(logits[:-1].double(), -1)
    targets = torch.tensor(np.asarray(ids[1:]))
    return float(torch.exp(-log_probs[torch.arange(len(ids) - 1), targets].mean()))


def test_llama_rmt_memory_matters(llama_rmt_export, llama_rmt_reference):
    """Issue 19's item 7 for the published Llama RMT: after a context, the exported
    model's memory zeroed (memory_in, the only state pair) changes the logits and the
    greedy ids; each row, with and without its memory, generates as the reference does
    from the same memory."""
    model = open_model(llama_rmt_export, backend="onnxruntime", threads=1)
    names = list(model.initial_state)
    assert names == ["memory_in"]
    bounds = segment_bounds(len(LLAMA_DOC), model.config)
    question = LLAMA_DOC[bounds[-1][0]:]
    seen: list[np.ndarray] = []
    with Stepper(model.engine) as stepper:
        for key in (0, 1):
            stepper.add(key, model.initial_state)
        for start, end in bounds[:-1]:
            stepper.step([0, 1], [LLAMA_DOC[start:end]] * 2, logits=False)
        stepper.zero([1], names)
        got = stepper.generate([0, 1], [question] * 2, GREEDY,
                               on_logits=lambda logits: seen.append(logits.copy()))
    memory = memory_before(llama_rmt_reference, LLAMA_DOC.tolist())
    assert memory.abs().max() > 0.1
    for row, start in enumerate((memory, torch.zeros_like(memory))):
        ids, logits = reference_generation(llama_rmt_reference, LLAMA_DOC.tolist(), start,
                                           GREEDY)
        assert got[row] == ids
        np.testing.assert_allclose(seen[0][row], logits[0], atol=1e-4, rtol=0)
    assert np.abs(seen[0][0] - seen[0][1]).max() > 0.1  # the first token's logits
    assert got[0] != got[1]


def test_llama_rmt_session_saves_and_restores_as_rmt_run(llama_rmt_export,
                                                        llama_rmt_reference):
    """A stream session of the Llama RMT, saved mid-segment and restored into the
    model opened again, gives rmt-run's perplexity and memory, which are the
    reference's."""
    model = open_model(llama_rmt_export, backend="onnxruntime", threads=1)
    whole = model.run_one(LLAMA_DOC)
    expected = reference_perplexity(llama_rmt_reference, LLAMA_DOC)
    assert whole.perplexity == pytest.approx(expected, rel=1e-4)
    session = model.session()
    session.feed(LLAMA_DOC[:9])
    data = session.save()
    session.feed(LLAMA_DOC[9:])
    assert session.close().perplexity == pytest.approx(whole.perplexity, rel=1e-5)
    restored = open_model(llama_rmt_export, backend="onnxruntime", threads=1) \
        .restore_session(data)
    assert restored.tokens == 9
    restored.feed(LLAMA_DOC[9:])
    result = restored.close()
    assert result.perplexity == pytest.approx(whole.perplexity, rel=1e-5)
    np.testing.assert_allclose(result.memory, whole.memory, atol=1e-5)
    assert (result.tokens, result.segments) == (whole.tokens, whole.segments)


def test_llama_rmt_text_session_restored_gives_rmt_runs_perplexity(llama_rmt_export,
                                                                   tmp_path):
    """Text fed to a Llama RMT session in pieces cut inside words, saved and restored
    mid-way: its perplexity and token count are those rmt-run prints for the text file."""
    text = "the memory cell reads a text file, one segment after another; " * 3
    path = tmp_path / "doc.txt"
    path.write_text(text)
    result = CliRunner().invoke(run_main, [str(llama_rmt_export), str(path), "--json",
                                           "--threads", "1"])
    assert result.exit_code == 0, result.output
    expected = json.loads(result.stdout)
    model = open_model(llama_rmt_export, backend="onnxruntime", threads=1)
    session = model.session()
    for start in range(0, 61, 7):
        session.feed(text[start: start + 7])
    restored = model.restore_session(session.save())
    session.discard()
    for start in range(63, len(text), 7):
        restored.feed(text[start: start + 7])
    got = restored.close()
    assert (got.tokens, got.segments) == (expected["tokens"], expected["segments"])
    assert expected["segments"] > 10
    assert got.perplexity == pytest.approx(expected["perplexity"], rel=1e-5)


def test_llama_rmt_session_pool_batches_rows_at_different_segments(llama_rmt_export):
    """Two Llama RMT streams stepped together, one on its first segment and one on a
    later one: each gets what it gets alone."""
    model = open_model(llama_rmt_export, backend="onnxruntime", threads=1)
    docs = [LLAMA_DOC, LLAMA_DOC[::-1].copy()]
    alone = [model.run_one(doc) for doc in docs]
    with SessionPool(model) as pool:
        ids = [pool.open(), pool.open()]
        pool.feed(ids[0], LLAMA_DOC[:6])
        threads = [threading.Thread(target=pool.feed, args=(ids[0], LLAMA_DOC[6:])),
                   threading.Thread(target=pool.feed, args=(ids[1], docs[1]))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        got = [pool.close(i) for i in ids]
    assert [g.perplexity for g in got] == pytest.approx([a.perplexity for a in alone],
                                                        rel=1e-5)
    for result, expected in zip(got, alone, strict=True):
        np.testing.assert_allclose(result.memory, expected.memory, atol=1e-5)
