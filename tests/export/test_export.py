"""rmt-export's library side: what an export folder holds, what its manifest records,
that the ONNX graphs are sound and batch-dynamic, that the authors' checkpoints export to
graphs equal to their source models, and that an export folder is written atomically."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import (
    MEMORY_DECODER_INIT,
    make_decoder,
    make_encoder,
    write_bert_folder,
    write_gpt2_folder,
)
from tokenizers import Tokenizer

import rmt_deploy
from rmt_deploy.contract import DECODE, PREFILL, STEP, WRITE, variants
from rmt_deploy.errors import ManifestError, RmtError, ValidationError
from rmt_deploy.export.pipeline import ExportOptions, default_output, export_checkpoint
from rmt_deploy.export.validate import Tolerance
from rmt_deploy.manifest import read_manifest
from rmt_deploy.model.base import StepVariant
from rmt_deploy.model.checkpoint import AuthorsOptions, load_checkpoint, save_checkpoint
from rmt_deploy.runtime import RMTModel, open_model
from rmt_deploy.runtime.backends.torch import TorchEngine
from rmt_deploy.runtime.tokens import plain_tokenizer
from rmt_deploy.segmentation import step_inputs
from rmt_deploy.spec import RMTConfig

torch.set_num_threads(1)  # a training job shares this machine's two cores

#: Quick options for exports whose validation figures are not under test.
FAST = ExportOptions(validation_segments=3, threads=1)
FAILING = ExportOptions(tolerance=Tolerance(open_loop=1e-30, closed_loop=1e-30),
                        validation_segments=2, threads=1)
ENCODER_FILES = {"model.onnx", "write.onnx", "weights.data", "rmt.json", "memory_in.init.npy",
                 "tokenizer.json"}
DECODER_FILES = ENCODER_FILES | {"prefill.onnx", "decode.onnx"}
LABELS = ("a", "b", "c")


# ---------------------------------------------------------------- helpers


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def hidden_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def reference_model(rmt, tokenizer_json: str | None = None) -> RMTModel:
    """The source model on the torch backend, driven by the same runtime loop."""
    from tokenizers import Tokenizer

    engine = TorchEngine(rmt, threads=1)
    tokenizer = Tokenizer.from_str(tokenizer_json) if tokenizer_json else None
    return RMTModel(engine, engine.initial_state(), tokenizer)


def assert_same_results(exported: RMTModel, reference: RMTModel, documents, generate=0):
    """Both models give the same outputs (within float noise) on a batch of documents."""
    got = exported.run(documents, generate=generate).outputs
    want = reference.run(documents, generate=generate).outputs
    assert len(got) == len(want) == len(documents)
    assert max(o.segments for o in want) >= 3  # the recurrence really ran
    for a, b in zip(got, want, strict=True):
        assert (a.tokens, a.segments) == (b.tokens, b.segments)
        np.testing.assert_allclose(a.memory, b.memory, atol=1e-4, rtol=0)
        if exported.config.is_encoder:
            assert a.label == b.label
            np.testing.assert_allclose(a.logits, b.logits, atol=1e-4, rtol=0)
        elif generate:  # generation computes no perplexity
            assert a.perplexity is None and b.perplexity is None
            assert a.generated_ids == b.generated_ids and len(a.generated_ids) >= 1
        else:
            assert math.isfinite(a.perplexity)
            assert a.perplexity == pytest.approx(b.perplexity, rel=1e-4)


def authors_bert_checkpoint(folder: Path, rmt) -> Path:
    """``model_best.pth`` exactly as the 1M-token paper's RMT wrapper saves it."""
    m, vocab = rmt.rmt_config.num_mem_tokens, rmt.rmt_config.vocab_size
    sd = {"cls_token": torch.tensor([2]), "sep_token": torch.tensor([3]),
          "mem_token_ids": torch.arange(vocab - m, vocab)}
    sd.update({key: value.clone() for key, value in rmt.state_dict().items()})
    sd["model.embeddings.weight"] = sd["model.bert.embeddings.word_embeddings.weight"]
    sd["model.bert.embeddings.position_ids"] = torch.arange(32).unsqueeze(0)
    path = folder / "model_best.pth"
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}
    torch.save({"model_state_dict": sd, "optimizer_state_dict": optimizer, "epoch": 3}, path)
    return path


def authors_gpt2_checkpoint(folder: Path, rmt) -> Path:
    """BABILong's flat ``pytorch_model.bin``."""
    path = folder / "pytorch_model.bin"
    torch.save({f"memory_cell.{k}": v.clone() for k, v in rmt.state_dict().items()}, path)
    return path


# ---------------------------------------------------------------- folder and manifest


@pytest.mark.parametrize("variant", ["encoder", "decoder"])
def test_export_folder_and_manifest(variant, request):
    checkpoint = request.getfixturevalue(f"{variant}_checkpoint")
    folder = request.getfixturevalue(f"{variant}_export")
    expected_files = ENCODER_FILES if variant == "encoder" else DECODER_FILES
    assert {p.name for p in folder.iterdir()} == expected_files  # nothing stray (.inferred)
    assert hidden_leftovers(folder.parent) == []

    data = json.loads((folder / "rmt.json").read_text())
    assert data["format"] == "rmt-deploy-export" and data["format_version"] == 3
    loaded = load_checkpoint(checkpoint)
    config = loaded.rmt.rmt_config
    assert RMTConfig.from_dict(data["rmt_config"]) == config
    m, h = config.num_mem_tokens, config.hidden_size

    # tensor names and shapes: batch dynamic; decoder tokens dynamic, encoder positions fixed
    graphs = data["graphs"]
    assert set(graphs) == ({"step", "write"} if variant == "encoder"
                           else {"step", "write", "prefill", "decode"})
    positions = config.input_size if variant == "encoder" else "tokens"
    ids_shape = ["batch", positions]
    logits_shape = (["batch", len(config.labels)] if variant == "encoder"
                    else ["batch", "tokens", config.vocab_size])
    memory = {"name": "memory_in", "dtype": "float32", "shape": ["batch", m, h]}
    step = graphs["step"]
    assert step["file"] == "model.onnx"
    assert step["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ids_shape},
                              {"name": "attention_mask", "dtype": "int64", "shape": ids_shape},
                              memory]
    assert step["outputs"] == [
        {"name": "logits", "dtype": "float32", "shape": logits_shape},
        {"name": "memory_out", "dtype": "float32", "shape": ["batch", m, h]}]
    write = graphs["write"]
    assert write["file"] == "write.onnx"
    assert write["inputs"] == step["inputs"] and write["outputs"] == step["outputs"][1:]
    if variant == "decoder":
        kv = [config.cache_heads, config.head_dim]
        prefill, decode = graphs["prefill"], graphs["decode"]
        assert (prefill["file"], decode["file"]) == ("prefill.onnx", "decode.onnx")
        assert prefill["inputs"] == step["inputs"]
        assert [t["name"] for t in decode["inputs"]] == ["input_ids", "attention_mask"] + [
            f"past.{i}.{k}" for i in range(config.cache_layers) for k in ("key", "value")]
        assert decode["inputs"][2]["shape"] == ["batch", kv[0], "past", kv[1]]
        assert decode["outputs"][0] == prefill["outputs"][0] == {
            "name": "logits", "dtype": "float32", "shape": ["batch", config.vocab_size]}
        assert prefill["outputs"][1]["shape"] == ["batch", kv[0], "context", kv[1]]
        assert decode["outputs"][1]["shape"] == ["batch", kv[0], "total", kv[1]]
    weights = {"file": "weights.data", "sha256": sha256(folder / "weights.data")}
    for graph in graphs.values():
        assert graph["precision"] == "fp32"
        assert graph["sha256"] == sha256(folder / graph["file"])
        assert graph["data"] == [weights]  # every graph reads the one weights file
    tensors = data["weights"]["tensors"]
    assert data["weights"]["file"] == "weights.data" and tensors
    assert (folder / "weights.data").stat().st_size == max(
        t["offset"] + t["bytes"] for t in tensors.values())

    # initial memory, tokenizer, source
    init = data["initial_state"]["memory_in"]
    assert init["file"] == "memory_in.init.npy" and init["dtype"] == "float32"
    assert init["shape"] == [m, h] and init["sha256"] == sha256(folder / "memory_in.init.npy")
    expected_memory = loaded.rmt.initial_memory(1)[0].detach().numpy()
    np.testing.assert_array_equal(np.load(folder / "memory_in.init.npy"), expected_memory)
    assert data["tokenizer"]["file"] == "tokenizer.json"
    assert data["tokenizer"]["sha256"] == sha256(folder / "tokenizer.json")
    written = Tokenizer.from_file(str(folder / "tokenizer.json"))  # the checkpoint's, plain
    assert written.to_str() == plain_tokenizer(Tokenizer.from_str(loaded.tokenizer_json)).to_str()
    assert data["source"] == {"checkpoint": checkpoint.name, "sha256": sha256(checkpoint),
                              "format": "rmt-deploy"}

    # exporter versions
    exporter = data["exporter"]
    assert exporter["opset"] >= 17
    assert exporter["rmt_deploy"] == rmt_deploy.__version__
    assert exporter["torch"] == torch.__version__
    assert exporter["onnx"] == onnx.__version__
    assert exporter["exporter"] and exporter["python"]

    # validation: fp32, both loops, every output, within tolerance, over >= 32 segments
    results = data["validation"]["fp32"]
    assert results["segments"] >= 32
    assert results["runtime"] == f"onnxruntime {ort.__version__}"
    tolerance = results["tolerance"]
    assert tolerance == {"open_loop": 1e-4, "closed_loop": 1e-3}
    outputs = {"logits", "memory_out", "write_memory_out"}
    for mode in ("open_loop", "closed_loop"):
        errors = results[mode]["max_abs"]
        assert set(errors) == outputs, mode
        for name, error in errors.items():
            assert 0 <= error <= tolerance[mode], (mode, name, error)
        assert 0.999 < results[mode]["min_memory_cosine"] <= 1 + 1e-9

    if variant == "decoder":  # generation with the KV cache: the reference's tokens
        generation = results["generation"]
        assert generation["generated_same"] == 1 and generation["rows"] == 4
        assert set(generation["max_abs"]) == {"prefill_logits", "decode_logits"}
        assert max(generation["max_abs"].values()) <= tolerance["open_loop"]

    # and the library reads it back, every hash verified
    manifest = read_manifest(folder)
    assert manifest.config == config and manifest.folder == folder


def test_manifest_hashes_are_checked_on_read(encoder_export, tmp_path):
    folder = shutil.copytree(encoder_export, tmp_path / "copy")
    read_manifest(folder)
    with open(folder / "memory_in.init.npy", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x00\x80\x7f")
    with pytest.raises(ManifestError, match="sha256 does not match"):
        read_manifest(folder)


def test_closed_loop_validation_runs_the_recorded_number_of_segments(encoder_checkpoint):
    from engines import CountingEngine

    from rmt_deploy.export.comparator import compare

    rmt = load_checkpoint(encoder_checkpoint).rmt
    reference = TorchEngine(rmt, threads=1)
    counting = CountingEngine(TorchEngine(rmt, threads=1))
    results = compare(reference, counting, reference.initial_state(), 32)
    assert results.segments == 32
    assert counting.counts["steps"] >= 2 * 32  # open and closed loop: >= 32 segments each
    assert {1, 3} <= set(counting.batches)  # batches of one and three rows
    assert counting.graphs == reference.graphs  # the wrapper hides nothing of the engine
    outputs = {"logits", "memory_out"} | ({"write_memory_out"} if WRITE in reference.graphs
                                          else set())
    assert len(results.loops) == 2
    for loop in results.loops:  # the same engine: no error at all
        assert set(loop.max_abs) == outputs
        assert all(error == 0.0 for error in loop.max_abs.values())


# ---------------------------------------------------------------- the ONNX graphs


def dims(value_info) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def random_step(config: RMTConfig, batch: int, width: int, seed: int):
    """Inputs of one step: ``batch`` segments of up to ``width`` tokens, perturbed memory."""
    rng = np.random.default_rng(seed)
    low = max(config.strip_token_ids, default=-1) + 1
    high = config.vocab_size - (config.num_mem_tokens if config.is_encoder else 0)
    lengths = [width] + list(rng.integers(1, width + 1, batch - 1))
    ids, mask = step_inputs([rng.integers(low, high, n) for n in lengths], config)
    memory = rng.normal(0, 0.5, (batch, config.num_mem_tokens, config.hidden_size))
    return ids, mask, memory.astype(np.float32)


@pytest.mark.parametrize("variant", ["encoder", "decoder"])
def test_onnx_graphs_are_valid_and_batch_dynamic(variant, request):
    folder = request.getfixturevalue(f"{variant}_export")
    rmt = load_checkpoint(request.getfixturevalue(f"{variant}_checkpoint")).rmt
    config = rmt.rmt_config
    methods = {STEP: "forward", WRITE: "write"}  # generation graphs: test_generation_graphs
    for graph in methods:
        contract = variants(config)[graph]
        file, names = contract.file, [t.name for t in contract.outputs]
        model = onnx.load(folder / file)
        onnx.checker.check_model(model, full_check=True)
        opsets = {entry.domain: entry.version for entry in model.opset_import}
        assert opsets.get("", opsets.get("ai.onnx")) >= 17
        inputs = {value.name: dims(value) for value in model.graph.input}
        outputs = {value.name: dims(value) for value in model.graph.output}
        assert [value.name for value in model.graph.input] == [
            "input_ids", "attention_mask", "memory_in"]
        assert [value.name for value in model.graph.output] == names
        for name, shape in {**inputs, **outputs}.items():
            assert isinstance(shape[0], str) and shape[0], (file, name, shape)  # symbolic
        assert inputs["memory_in"][1:] == [config.num_mem_tokens, config.hidden_size]
        if variant == "encoder":
            assert inputs["input_ids"][1] == config.input_size
            if "logits" in names:
                assert outputs["logits"][1:] == [len(config.labels)]
        else:
            assert isinstance(inputs["input_ids"][1], str)  # tokens axis dynamic
            if "logits" in names:
                assert outputs["logits"][2] == config.vocab_size

        session = ort.InferenceSession(str(folder / file), providers=["CPUExecutionProvider"])
        widths = [config.segment_size] if variant == "encoder" else [config.segment_size, 2]
        for width in widths:
            results = {}
            for batch in (1, 3, 5):
                ids, mask, memory = random_step(config, batch, width, seed=batch)
                feed = {"input_ids": ids, "attention_mask": mask, "memory_in": memory}
                got = session.run(None, feed)
                with torch.no_grad():
                    args = (torch.from_numpy(ids), torch.from_numpy(mask),
                            torch.from_numpy(memory))
                    want = StepVariant(rmt, methods[graph])(*args)
                want = want if isinstance(want, tuple) else (want,)
                assert len(got) == len(want) == len(names)
                keep = mask.astype(bool)
                for index, (a, b) in enumerate(zip(got, want, strict=True)):
                    b = b.numpy()
                    assert a.shape == b.shape and a.shape[0] == batch
                    if variant == "decoder" and names[index] == "logits":  # padding unused
                        a, b = a[keep], b[keep]
                    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
                results[batch] = (ids, mask, memory, got)
            # a row's result does not depend on the other rows of its batch or on padding
            ids, mask, memory, got = results[5]
            for row in range(5):
                real = int(mask[row].sum()) if variant == "decoder" else ids.shape[1]
                alone = session.run(None, {"input_ids": ids[row:row + 1, :real],
                                           "attention_mask": mask[row:row + 1, :real],
                                           "memory_in": memory[row:row + 1]})
                for index, (a, b) in enumerate(zip(alone, got, strict=True)):
                    b = b[row][:real] if variant == "decoder" and names[index] == "logits" \
                        else b[row]
                    np.testing.assert_allclose(a[0], b, atol=1e-5, rtol=0)


def test_generation_graphs_are_valid_and_their_axes_dynamic(decoder_export, decoder_checkpoint):
    config = load_checkpoint(decoder_checkpoint).rmt.rmt_config
    for graph in (PREFILL, DECODE):
        contract = variants(config)[graph]
        model = onnx.load(decoder_export / contract.file)
        onnx.checker.check_model(model, full_check=True)
        declared = {t.name: list(t.shape) for t in (*contract.inputs, *contract.outputs)}
        found = {v.name: dims(v) for v in (*model.graph.input, *model.graph.output)}
        assert found.keys() == declared.keys()
        for name, shape in declared.items():
            for want, got in zip(shape, found[name], strict=True):
                assert got == want if isinstance(want, int) else isinstance(got, str), (
                    graph, name, found[name])


# ---------------------------------------------------------------- authors' checkpoints


def test_authors_bert_checkpoint_exports_equal_to_its_source(tmp_path):
    source = make_encoder(seed=3)
    path = authors_bert_checkpoint(tmp_path, source)
    base = write_bert_folder(tmp_path / "bert-base")
    options = ExportOptions(authors=AuthorsOptions(base_model=base, input_size=16,
                                                   labels=LABELS),
                            validation_segments=3, threads=1)
    manifest = export_checkpoint(path, tmp_path / "out", options)
    assert manifest.folder == tmp_path / "out"
    assert {p.name for p in manifest.folder.iterdir()} == ENCODER_FILES
    assert manifest.source == {"checkpoint": "model_best.pth", "sha256": sha256(path),
                               "format": "authors-bert"}
    assert manifest.config == source.rmt_config
    np.testing.assert_array_equal(manifest.load_initial_state()["memory_in"],
                                  source.initial_memory(1)[0].detach().numpy())

    exported = open_model(manifest.folder, threads=1)
    assert exported.backend == "onnxruntime" and exported.config.labels == LABELS
    reference = reference_model(source, (manifest.folder / "tokenizer.json").read_text())
    docs = [np.arange(5, 50), np.arange(40, 5, -1), np.array([7, 8, 9])]
    assert_same_results(exported, reference, docs)
    # the base folder's WordPiece vocabulary is the export's tokenizer
    text = " ".join(f"w{i % 45}" for i in range(7, 40))
    assert_same_results(exported, reference, [text, "w1 w2 w3"])
    assert exported.run_one(text).tokens == 33


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_authors_gpt2_checkpoint_exports_equal_to_its_source(tmp_path, family):
    """The BABILong layout (memory_cell.*) over a GPT-2 or a Llama-architecture base."""
    # GPT-2 drawn as the memory decoder is, so that generation depends on the memory (a
    # Llama drawn that wide amplifies float noise past the 1e-4 the results are held to)
    source = make_decoder(seed=4, num_mem_tokens=3, family=family, initializer_range=(
        MEMORY_DECODER_INIT if family == "gpt2" else None))
    with torch.no_grad():
        source.memory.mul_(2.0).add_(0.25)  # a trained, non-default memory
    path = authors_gpt2_checkpoint(tmp_path, source)
    base = write_gpt2_folder(tmp_path / "gpt2-base", family)
    options = ExportOptions(authors=AuthorsOptions(base_model=base, segment_size=5),
                            validation_segments=3, threads=1)
    manifest = export_checkpoint(path, tmp_path / "out", options)
    assert {p.name for p in manifest.folder.iterdir()} == DECODER_FILES
    assert manifest.source["format"] == "authors-gpt2"
    assert manifest.source["sha256"] == sha256(path)
    assert manifest.config == source.rmt_config
    np.testing.assert_array_equal(manifest.load_initial_state()["memory_in"],
                                  source.memory.detach().numpy())

    exported = open_model(manifest.folder, threads=1)
    reference = reference_model(source, (base / "tokenizer.json").read_text())
    docs = [[(7 * i) % 58 for i in range(23)], list(range(30, 42)), [4, 9, 16]]
    assert_same_results(exported, reference, docs)
    assert_same_results(exported, reference, docs, generate=3)
    text = "the quick brown fox jumps over the lazy dog"
    assert_same_results(exported, reference, [text], generate=2)


# ---------------------------------------------------------------- atomic writes


def own_checkpoint(folder: Path, seed: int, variant: str = "encoder") -> Path:
    rmt = make_encoder(seed=seed) if variant == "encoder" else make_decoder(seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(rmt, folder / f"{variant}-{seed}.pt", None)


@pytest.mark.parametrize("variant", ["encoder", "decoder"])
def test_tolerance_failure_leaves_nothing_behind(tmp_path, variant):
    checkpoint = own_checkpoint(tmp_path / "ckpt", 1, variant)
    out = tmp_path / "exports" / "out"
    with pytest.raises(ValidationError, match="above the tolerance") as info:
        export_checkpoint(checkpoint, out, FAILING)
    assert "\n" not in str(info.value)
    assert not out.exists()
    assert list((tmp_path / "exports").iterdir()) == []  # no .out.partial-* either
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [checkpoint.name]


@pytest.mark.parametrize("existing", ["folder", "file"])
def test_an_existing_non_export_target_is_refused_untouched(tmp_path, existing):
    checkpoint = own_checkpoint(tmp_path / "ckpt", 1)
    out = tmp_path / "precious"
    if existing == "folder":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
        (out / "sub").mkdir()
        (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
        before = snapshot(out)
    else:
        out.write_text("a file, not a folder")
    with pytest.raises(RmtError, match="precious") as info:
        export_checkpoint(checkpoint, out, FAST)
    assert "-o" in str(info.value)
    if existing == "folder":
        assert snapshot(out) == before
    else:
        assert out.read_text() == "a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "precious"]


def test_an_empty_existing_folder_is_a_valid_target(tmp_path):
    checkpoint = own_checkpoint(tmp_path / "ckpt", 1)
    (tmp_path / "out").mkdir()
    manifest = export_checkpoint(checkpoint, tmp_path / "out", FAST)
    assert {p.name for p in manifest.folder.iterdir()} == ENCODER_FILES - {"tokenizer.json"}
    assert hidden_leftovers(tmp_path) == []


def test_reexport_replaces_an_existing_export(encoder_export, tmp_path):
    out = shutil.copytree(encoder_export, tmp_path / "out")
    old_step = sha256(out / "model.onnx")
    checkpoint = own_checkpoint(tmp_path / "ckpt", 7)
    manifest = export_checkpoint(checkpoint, out, FAST)
    assert manifest.folder == out
    assert {p.name for p in out.iterdir()} == ENCODER_FILES - {"tokenizer.json"}
    assert manifest.source["sha256"] == sha256(checkpoint)
    assert sha256(out / "model.onnx") != old_step
    assert manifest.validation["fp32"]["segments"] == 3
    assert hidden_leftovers(tmp_path) == []  # no .out.old-* or .out.partial-*
    read_manifest(out)
    reference = reference_model(make_encoder(seed=7))
    assert_same_results(open_model(out, threads=1), reference, [np.arange(5, 45)])


def test_failed_reexport_keeps_the_old_export_intact(encoder_export, tmp_path):
    out = shutil.copytree(encoder_export, tmp_path / "out")
    before = snapshot(out)
    checkpoint = own_checkpoint(tmp_path / "ckpt", 7)
    with pytest.raises(ValidationError):
        export_checkpoint(checkpoint, out, FAILING)
    assert snapshot(out) == before
    assert hidden_leftovers(tmp_path) == []
    manifest = read_manifest(out)
    assert manifest.source["checkpoint"] == "encoder.pt"
    output = open_model(out, threads=1).run_one("w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12")
    assert output.tokens == 12 and output.segments == 2


# ---------------------------------------------------------------- default folder


def test_default_output_folder_is_beside_the_checkpoint(tmp_path):
    assert default_output(Path("/x/y/model.safetensors")) == Path("/x/y/model-export")
    assert default_output(Path("run.3.pt")) == Path("run.3-export")
    checkpoint = own_checkpoint(tmp_path / "models", 2, "decoder")
    checkpoint = checkpoint.rename(checkpoint.with_name("my.decoder.pt"))
    manifest = export_checkpoint(checkpoint, options=FAST)
    assert manifest.folder == tmp_path / "models" / "my.decoder-export"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "my.decoder-export", "my.decoder.pt"]
    assert {p.name for p in manifest.folder.iterdir()} == DECODER_FILES - {"tokenizer.json"}
    assert manifest.source["checkpoint"] == "my.decoder.pt"


# ---------------------------------------------------------------- what a target may hold


def dead_pid() -> int:
    """The pid of a process that has exited."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def not_loaded(monkeypatch) -> None:
    """Make loading the checkpoint fail loudly: a refused target must not get that far."""
    import rmt_deploy.export.pipeline as pipeline

    def load(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the target was refused")

    monkeypatch.setattr(pipeline, "load_checkpoint", load)


def test_an_export_holding_other_files_is_refused_and_named(encoder_export, tmp_path,
                                                            monkeypatch):
    out = shutil.copytree(encoder_export, tmp_path / "out")
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (out / name).write_text(name)
    (out / "sub").mkdir()
    (out / "sub" / "e.bin").write_bytes(b"e")
    (out / "empty").mkdir()
    before = snapshot(out)
    not_loaded(monkeypatch)
    with pytest.raises(RmtError) as info:
        export_checkpoint(own_checkpoint(tmp_path / "ckpt", 1), out, FAST)
    message = str(info.value)
    assert "a.txt, b.txt, c.txt +3 more" in message and "move them out" in message
    assert snapshot(out) == before and (out / "empty").is_dir()


@pytest.mark.parametrize("inside", ["checkpoint", "base model", "calibration"])
def test_an_export_folder_holding_an_input_is_refused(encoder_export, tmp_path, inside,
                                                      monkeypatch):
    out = shutil.copytree(encoder_export, tmp_path / "out")
    checkpoint = own_checkpoint(tmp_path / "ckpt", 1)
    options = FAST
    if inside == "checkpoint":
        checkpoint = Path(shutil.copy(checkpoint, out / "model_best.pth"))
    elif inside == "base model":
        options = ExportOptions(authors=AuthorsOptions(base_model=out), threads=1)
    else:
        options = ExportOptions(calibration=out / "model.onnx", threads=1)
    before = snapshot(out)
    not_loaded(monkeypatch)
    with pytest.raises(RmtError, match="an input of this export"):
        export_checkpoint(checkpoint, out, options)
    assert snapshot(out) == before
    with pytest.raises(RmtError, match="an input of this export"):
        export_checkpoint(checkpoint, checkpoint, options)  # -o the checkpoint itself


@pytest.mark.parametrize("target", ["cwd", "parent", "home", "root", "dot-dot", "link"])
def test_the_current_folder_home_and_their_parents_are_refused(tmp_path, monkeypatch, target):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("keep")
    (tmp_path / "home").mkdir()
    (tmp_path / "link").symlink_to(work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    out = {"cwd": Path("."), "parent": Path(".."), "home": tmp_path / "home", "root": Path("/"),
           "dot-dot": Path("sub/.."), "link": tmp_path / "link"}[target]
    not_loaded(monkeypatch)
    what = "home folder" if target == "home" else "current folder"
    with pytest.raises(RmtError, match=f"the {what} or a folder above it"):
        export_checkpoint(tmp_path / "absent.pt", out, FAST)
    assert (work / "notes.txt").read_text() == "keep"


def test_a_file_added_during_the_export_keeps_the_old_export(encoder_export, tmp_path):
    out = shutil.copytree(encoder_export, tmp_path / "out")
    before = snapshot(out)

    def meanwhile(message: str) -> None:  # the user saves a file there mid-export
        (out / "notes.txt").write_text("mine")

    with pytest.raises(RmtError, match="notes.txt"):
        export_checkpoint(own_checkpoint(tmp_path / "ckpt", 1), out, FAST, meanwhile)
    assert snapshot(out) == {**before, "notes.txt": b"mine"}
    assert hidden_leftovers(tmp_path) == []


def test_every_file_the_manifest_names_may_be_replaced(encoder_export, tmp_path):
    out = shutil.copytree(encoder_export, tmp_path / "out")
    manifest = json.loads((out / "rmt.json").read_text())
    manifest["engines"] = {"step": {"file": "model.plan", "sha256": "0" * 64}}
    manifest["graphs"]["step"]["external"] = [{"file": "weights/step.data"}]
    (out / "rmt.json").write_text(json.dumps(manifest))
    (out / "model.plan").write_bytes(b"plan")
    (out / "weights").mkdir()
    (out / "weights" / "step.data").write_bytes(b"data")
    (out / f".rmt.json.tmp-{dead_pid()}-0123456789ab").write_text("left by a kill")
    export_checkpoint(own_checkpoint(tmp_path / "ckpt", 1), out, FAST)
    assert {p.name for p in out.iterdir()} == ENCODER_FILES - {"tokenizer.json"}


def test_a_folder_with_a_foreign_rmt_json_is_not_an_export(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "rmt.json").write_text('{"format": "something else", "file": "rmt.json"}')
    not_loaded(monkeypatch)
    with pytest.raises(RmtError, match="not an rmt-export folder"):
        export_checkpoint(tmp_path / "absent.pt", out, FAST)


def test_work_left_by_a_killed_export_is_removed_and_nothing_else(tmp_path):
    checkpoint = own_checkpoint(tmp_path / "ckpt", 1)
    exports = tmp_path / "exports"
    exports.mkdir()
    gone, alive = dead_pid(), os.getpid()
    stale = [f".out.partial-{gone}-0123456789ab", f".out.old-{gone}-0123456789ab"]
    kept = [f".out.partial-{alive}-0123456789ab",  # a live process's
            f".other.partial-{gone}-0123456789ab",  # another folder's
            f".out.partial-{gone}-notours", f".out.partial-{gone}", "out.partial-1-0123456789ab",
            f".out.partial-{10**30}-0123456789ab",  # no such pid can exist
            f".out.tmp-{gone}-0123456789ab"]  # a file's, not a folder's
    for name in stale + kept:
        (exports / name).mkdir()
        (exports / name / "model.onnx").write_bytes(b"half")
    export_checkpoint(checkpoint, exports / "out", FAST)
    assert sorted(p.name for p in exports.iterdir()) == sorted(kept + ["out"])
