"""Hostile models, export folders and states: non-finite weights fail the export; an
export folder tampered with (its sha256s updated, so only the checks of what the files
hold catch it) is refused at open naming what is wrong; crafted ``--resume`` states with
a valid seal are checked against the model; ``--json`` prints strict JSON; ``--threads``
is bounded (harness: tests/hostile/harness.py)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bert_tokenizer_json, make_encoder
from harness import TEXT, Assets, Case, build_assets, run_case

from rmt_deploy.manifest import MAX_JSON_DEPTH, MAX_MANIFEST_BYTES
from rmt_deploy.runtime.options import host_cpus
from rmt_deploy.runtime.state import pack, unpack

VOCAB = 53  # the tiny encoder's vocabulary (50 words and 3 memory placeholders)
HIDDEN = 32
CPUS = host_cpus()


@dataclass(frozen=True)
class ModelAssets(Assets):
    nan_checkpoint: Path  # NaN in the classifier's weights
    inf_checkpoint: Path  # an Inf in an encoder layer's weights
    decoder: Path  # the tiny decoder's checkpoint
    state: bytes  # a valid state of ``good`` on TEXT, saved after its first 10 tokens


def _damaged_checkpoint(path: Path, tokenizer: str, parameter: str, value: float) -> Path:
    from rmt_deploy.model.checkpoint import save_checkpoint

    rmt = make_encoder()
    with torch.no_grad():
        dict(rmt.named_parameters())[parameter].view(-1)[:3] = value
    return save_checkpoint(rmt, path, tokenizer)


def _saved_state(export: Path, folder: Path) -> bytes:
    """What ``rmt-run good ok.txt --state-file S --state-every 1`` saves after its first
    segment (with the record of the input that --resume checks)."""
    from rmt_deploy.runtime import open_model
    from rmt_deploy.runtime.session import StreamSession
    from rmt_deploy.runtime.tokens import spool_file

    text = folder / "ok.txt"
    text.write_text(TEXT)
    model = open_model(export, backend="onnxruntime", threads=1)
    with spool_file(text, model.tokenizer, model.config) as source:
        total, read = len(source), model.config.segment_size
        ids = source.tokens(0, read)
    session = StreamSession(model, total_tokens=total)
    session.feed(ids)
    digest = hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest()
    data = session.save({"input": {"tokens": total, "read": read, "sha256": digest}})
    session.discard()
    return data


@pytest.fixture(scope="module")
def assets(encoder_checkpoint, encoder_export, decoder_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model-assets")
    shared = build_assets(encoder_checkpoint, encoder_export, folder)
    tokenizer = bert_tokenizer_json(tmp_path_factory)
    return ModelAssets(
        **vars(shared),
        nan_checkpoint=_damaged_checkpoint(folder / "nan.pt", tokenizer,
                                           "model.classifier.weight", math.nan),
        inf_checkpoint=_damaged_checkpoint(folder / "inf.pt", tokenizer,
                                           "model.bert.encoder.layer.0.output.dense.weight",
                                           math.inf),
        decoder=decoder_checkpoint, state=_saved_state(encoder_export, folder))


# -- tampered export folders ----------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tamper(folder: Path, edit=None) -> None:
    """Edit ``folder/rmt.json`` (``edit(data)`` changes it in place), then give every
    file it lists that exists its sha256 again, so only the checks of what the files and
    the manifest hold can catch the damage."""
    path = folder / "rmt.json"
    data = json.loads(path.read_text())
    if edit is not None:
        edit(data)
    entries = [g for g in data["graphs"].values()]
    entries += [d for g in data["graphs"].values() for d in g.get("data", [])]
    entries += [*data["initial_state"].values(), data.get("tokenizer") or {}]
    entries += list(data.get("engines", {}).values())
    for entry in entries:
        if "file" in entry and (folder / entry["file"]).is_file():
            entry["sha256"] = _sha256(folder / entry["file"])
    path.write_text(json.dumps(data, indent=2) + "\n")


def _run_export(scene, edit=None, backend="onnxruntime"):
    """``rmt-run good ok.txt --json`` on the export ``good/`` tampered by ``edit(folder)``."""
    folder = scene.export()
    if edit is not None:
        edit(folder)
    return [folder, scene.text(), "--json", "--threads", "1", "--backend", backend]


def _tampered(edit, backend="onnxruntime"):
    return lambda scene: _run_export(scene, edit, backend)


def _memory(array):
    def edit(folder):
        (folder / "memory_in.init.npy").unlink()
        np.save(folder / "memory_in.init.npy", array, allow_pickle=True)
        tamper(folder)
    return edit


class _Pwned:
    """Unpickling it creates ``pwned`` in the current folder (the work folder)."""

    def __reduce__(self):
        return open, ("pwned", "w")


def _pickled() -> np.ndarray:
    array = np.empty(1, dtype=object)
    array[0] = _Pwned()
    return array


def _nan_memory() -> np.ndarray:
    memory = np.zeros((3, HIDDEN), np.float32)
    memory[1, 2] = np.nan
    return memory


def _graph_file(name):
    def edit(folder):
        if name == "../x.onnx":
            shutil.copy(folder / "model.onnx", folder.parent / "x.onnx")
        elif name == "sub/model.onnx":
            (folder / "sub").mkdir()
            shutil.move(folder / "model.onnx", folder / "sub" / "model.onnx")
        tamper(folder, lambda data: data["graphs"]["step"].update(file=name))
    return edit


def _link_out(folder):
    (folder.parent / "elsewhere").mkdir()
    copy = shutil.copy(folder / "model.onnx", folder.parent / "elsewhere" / "model.onnx")
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").symlink_to(copy)  # the same bytes: the sha256 still matches
    tamper(folder)


def _manifest_text(folder, replace):
    """rmt.json with its ``extra`` replaced by the JSON text ``replace``."""
    data = json.loads((folder / "rmt.json").read_text())
    data["rmt_config"]["extra"] = {"mark": 1}
    text = json.dumps(data).replace('{"mark": 1}', replace)
    (folder / "rmt.json").write_text(text)


def _nested(depth):
    return lambda folder: _manifest_text(folder, "[" * depth + "]" * depth)


def _oversized(folder):
    data = (folder / "rmt.json").read_text()
    (folder / "rmt.json").write_text(data + " " * MAX_MANIFEST_BYTES)


def _config(**changes):
    return lambda folder: tamper(folder, lambda data: data["rmt_config"].update(changes))


def _declared(data, tensor, shape):
    """Every graph that declares ``tensor`` now declares it with ``shape``."""
    for graph in data["graphs"].values():
        for entry in graph["inputs"] + graph["outputs"]:
            if entry["name"] == tensor:
                entry["shape"] = shape


def _four_labels_declared(folder):
    """Four labels and a step graph that says its logits have four columns: the manifest
    agrees with itself, the graph (three) does not."""
    def edit(data):
        data["rmt_config"]["labels"] = ["a", "b", "c", "d"]
        _declared(data, "logits", ["batch", 4])
    tamper(folder, edit)


def _hidden_16_declared(folder):
    """hidden_size 16 everywhere in the manifest, and an initial memory of that width."""
    (folder / "memory_in.init.npy").unlink()
    np.save(folder / "memory_in.init.npy", np.zeros((3, 16), np.float32))

    def edit(data):
        data["rmt_config"]["hidden_size"] = 16
        data["initial_state"]["memory_in"]["shape"] = [3, 16]
        for tensor in ("memory_in", "memory_out"):
            _declared(data, tensor, ["batch", 3, 16])
    tamper(folder, edit)


def _wider_tokenizer(folder):
    """The export's tokenizer with 10 more tokens: ids up to 59, past the 53 the model
    has."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.add_tokens([f"extra{i}" for i in range(10)])
    (folder / "tokenizer.json").unlink()
    tokenizer.save(str(folder / "tokenizer.json"))
    tamper(folder)


def _missing_data(folder):
    entry = {"file": "model.onnx.data", "sha256": "0" * 64}
    tamper(folder, lambda data: data["graphs"]["step"]["data"].append(entry))


def _changed_data(folder):
    (folder / "model.onnx.data").write_bytes(b"weights")
    entry = {"file": "model.onnx.data", "sha256": hashlib.sha256(b"other").hexdigest()}
    tamper(folder)  # before the entry is listed: its sha256 stays the wrong one
    data = json.loads((folder / "rmt.json").read_text())
    data["graphs"]["step"]["data"].append(entry)
    (folder / "rmt.json").write_text(json.dumps(data))


def _changed_plan(folder):
    (folder / "model.plan").write_bytes(b"a plan")
    data = json.loads((folder / "rmt.json").read_text())
    data["engines"] = {"step": {"file": "model.plan",
                                "sha256": hashlib.sha256(b"another plan").hexdigest()}}
    (folder / "rmt.json").write_text(json.dumps(data))


NOT_PLAIN = "which is not a plain name inside the export folder"
TAMPERED_CASES = [
    Case("export-memory-init-nan", "rmt-run", _tampered(_memory(_nan_memory())),
         says=("memory_in.init.npy", "NaN or infinity")),
    Case("export-memory-init-pickled-object", "rmt-run", _tampered(_memory(_pickled())),
         says=("memory_in.init.npy", "not a readable .npy array", "allow_pickle"),
         absent=("pwned",)),
    Case("export-memory-init-float64", "rmt-run",
         _tampered(_memory(np.zeros((3, HIDDEN), np.float64))),
         says=("memory_in.init.npy", "float64 (3, 32), expected float32 (3, 32)")),
    Case("export-memory-init-wrong-shape", "rmt-run",
         _tampered(_memory(np.zeros((4, HIDDEN), np.float32))),
         says=("memory_in.init.npy", "float32 (4, 32), expected float32 (3, 32)")),
    Case("export-graph-file-dot-dot", "rmt-run", _tampered(_graph_file("../x.onnx")),
         says=("'../x.onnx'", NOT_PLAIN)),
    Case("export-graph-file-absolute", "rmt-run", _tampered(_graph_file("/etc/passwd")),
         says=("'/etc/passwd'", NOT_PLAIN)),
    Case("export-graph-file-in-a-subfolder", "rmt-run", _tampered(_graph_file("sub/model.onnx")),
         says=("'sub/model.onnx'", NOT_PLAIN)),
    Case("export-graph-a-link-out-of-the-folder", "rmt-run", _tampered(_link_out),
         says=("model.onnx", "a link that leaves the export folder")),
    Case("export-manifest-nested-10000-deep", "rmt-run", _tampered(_nested(10_000)),
         says=("rmt.json", f"nested at most {MAX_JSON_DEPTH} deep")),
    Case("export-manifest-nested-40-deep", "rmt-run", _tampered(_nested(40)),
         says=("rmt.json", f"nested at most {MAX_JSON_DEPTH} deep")),
    Case("export-manifest-oversized", "rmt-run", _tampered(_oversized),
         says=("rmt.json", "too large to be a manifest")),
    Case("export-config-hidden-size-changed", "rmt-run", _tampered(_config(hidden_size=16)),
         says=("graph 'step'", "memory_in float32[batch, 3, 32]", "hidden_size")),
    Case("export-config-labels-count-changed", "rmt-run",
         _tampered(_config(labels=["a", "b", "c", "d"])),
         says=("graph 'step'", "logits float32[batch, 3]", "labels")),
    Case("export-config-pad-outside-vocabulary", "rmt-run",
         _tampered(_config(pad_token_id=VOCAB)),
         says=("rmt.json", f"pad_token_id {VOCAB} lies outside the vocabulary [0, {VOCAB})")),
    Case("export-config-field-of-wrong-type", "rmt-run", _tampered(_config(hidden_size="32")),
         says=("rmt.json", "hidden_size is '32', expected int")),
    Case("export-config-armt-field-on-another-kind", "rmt-run", _tampered(_config(d_mem=4)),
         says=("rmt.json", "d_mem is set exactly for an armt RMT")),
    Case("export-graph-logits-narrower-than-declared-onnxruntime", "rmt-run",
         _tampered(_four_labels_declared), says=("logits", "in the graph", "declares")),
    Case("export-graph-logits-narrower-than-declared-openvino", "rmt-run",
         _tampered(_four_labels_declared, "openvino"),
         says=("logits", "in the graph", "declares")),
    Case("export-graph-memory-wider-than-declared", "rmt-run", _tampered(_hidden_16_declared),
         says=("memory_in", "in the graph", "declares")),
    Case("export-tokenizer-past-the-vocabulary-onnxruntime", "rmt-run",
         _tampered(_wider_tokenizer),
         says=("tokenizer.json", f"the tokenizer has 60 ids, the model's vocabulary {VOCAB}")),
    Case("export-tokenizer-past-the-vocabulary-openvino", "rmt-run",
         _tampered(_wider_tokenizer, "openvino"),
         says=("tokenizer.json", f"the tokenizer has 60 ids, the model's vocabulary {VOCAB}")),
    Case("export-graph-data-missing", "rmt-run", _tampered(_missing_data),
         says=("model.onnx.data", "missing from the export folder")),
    Case("export-graph-data-changed", "rmt-run", _tampered(_changed_data),
         says=("model.onnx.data", "sha256 does not match")),
    Case("export-plan-changed", "rmt-run", _tampered(_changed_plan),
         says=("model.plan", "sha256 does not match")),
]


# -- non-finite checkpoints -----------------------------------------------------------


def _export_damaged(which):
    def prepare(scene):
        checkpoint = shutil.copy(getattr(scene.assets, which), scene.work / "bad.pt")
        return [checkpoint, "-o", "out", "-q", "--threads", "1", "--validation-segments", "4"]
    return prepare


NON_FINITE = "NaN or infinite"
EXPORT_CASES = [
    Case("export-checkpoint-nan-classifier", "rmt-export", _export_damaged("nan_checkpoint"),
         says=("validation", "logits", NON_FINITE), absent=("out", "bad-export")),
    Case("export-checkpoint-inf-encoder-layer", "rmt-export",
         _export_damaged("inf_checkpoint"), says=("validation", NON_FINITE),
         absent=("out", "bad-export")),
]


# -- crafted --resume states ----------------------------------------------------------


def _resume(change=None):
    """``rmt-run good ok.txt --resume s.state`` with the saved state changed by
    ``change(header, arrays)`` and sealed again."""
    def prepare(scene):
        header, arrays = unpack(scene.assets.state)
        if change is not None:
            change(header, arrays)
        (scene.work / "s.state").write_bytes(pack(header, arrays))
        return [scene.export(), scene.text(), "--json", "--threads", "1", "--resume",
                "s.state"]
    return prepare


def _set(name, value):
    def change(header, arrays):
        arrays[name] = value(arrays[name])
    return change


def _poisoned(array, value=np.nan):
    array = array.copy()
    array.flat[0] = value
    return array


def _header(**values):
    return lambda header, arrays: header.update(values)


def _track(**values):
    return lambda header, arrays: header["tracks"][0].update(values)


def _one_more_token(header, arrays):
    header["tokens"] += 1


def _extra_track(header, arrays):
    header["tracks"].append(dict(header["tracks"][0], first=1))
    for name in ("state/memory_in", "logits"):
        arrays[name] = np.concatenate([arrays[name], arrays[name]])


MALFORMED = "s.state: state is malformed"
STATE_CASES = [
    Case("resume-crafted-state-intact-completes", "rmt-run", _resume(), code=0,
         removes=("s.state",)),
    Case("resume-memory-of-wrong-shape", "rmt-run",
         _resume(_set("state/memory_in", lambda m: np.zeros((1, 3, 16), np.float32))),
         says=(MALFORMED, "state memory_in is float32 (1, 3, 16)", "(1, 3, 32)")),
    Case("resume-memory-nan", "rmt-run", _resume(_set("state/memory_in", _poisoned)),
         says=(MALFORMED, "memory_in", "NaN or infinity")),
    Case("resume-memory-inf", "rmt-run",
         _resume(_set("state/memory_in", lambda m: _poisoned(m, np.inf))),
         says=(MALFORMED, "memory_in", "NaN or infinity")),
    Case("resume-logits-nan", "rmt-run", _resume(_set("logits", _poisoned)),
         says=(MALFORMED, "logits", "NaN or infinity")),
    Case("resume-token-ids-past-the-vocabulary", "rmt-run",
         _resume(_set("ids", lambda ids: _poisoned(ids, VOCAB))),
         says=(MALFORMED, f"outside [0, {VOCAB})")),
    Case("resume-negative-token-id", "rmt-run",
         _resume(_set("ids", lambda ids: _poisoned(ids, -1))),
         says=(MALFORMED, f"outside [0, {VOCAB})")),
    Case("resume-negative-count", "rmt-run", _resume(_track(done=-5)),
         says=(MALFORMED, "-5 is not a count")),
    Case("resume-negative-tokens", "rmt-run", _resume(_header(tokens=-10)),
         says=(MALFORMED, "-10 is not a count")),
    Case("resume-count-not-an-int", "rmt-run", _resume(_header(base=5.5)),
         says=(MALFORMED, "5.5 is not a count")),
    Case("resume-tokens-do-not-add-up", "rmt-run", _resume(_one_more_token),
         says=(MALFORMED, "token counts do not add up")),
    Case("resume-tracks-of-another-segmentation", "rmt-run", _resume(_track(first=3)),
         says=(MALFORMED, "tracks do not match the model's segmentation")),
    Case("resume-one-track-too-many", "rmt-run", _resume(_extra_track),
         says=(MALFORMED, "tracks do not match the model's segmentation")),
    Case("resume-text-started-not-a-bool", "rmt-run", _resume(_header(text_started="yes")),
         says=(MALFORMED, "text_started is not a bool")),
]


# -- options and output -----------------------------------------------------------------


def _threads(scene):
    return [scene.export(), scene.text(), "--json", "--threads", "100000"]


def _surrogate(scene):
    (scene.work / "s.txt").write_bytes(SURROGATE)
    return [scene.export(), "s.txt", "--json", "--threads", "1"]


def _missing_plan(scene):
    return [scene.export() / "model.plan", scene.text(), "--json", "--threads", "1"]


def _int8_of_fp32_export(scene):
    return [scene.export(), scene.text(), "--json", "--precision", "int8"]


#: A lone surrogate (U+D800) as UTF-8-style bytes: not UTF-8.
SURROGATE = b"w1 w2 \xed\xa0\x80 w3\n"
OPTION_CASES = [
    Case("run-threads-100000", "rmt-run", _threads,
         says=("threads 100000", f"this host has {CPUS} CPU")),
    Case("run-input-lone-surrogate", "rmt-run", _surrogate,
         says=("s.txt", "not UTF-8 text (byte 0xed at offset 6)")),
    Case("run-stdin-lone-surrogate", "rmt-run",
         lambda scene: [scene.export(), "-", "--json", "--threads", "1"], stdin=SURROGATE,
         says=("not UTF-8 text",)),
    Case("run-missing-plan", "rmt-run", _missing_plan,
         says=("good/model.plan", "no such TensorRT plan", "rmt-export --engine")),
    Case("run-int8-of-an-fp32-export", "rmt-run", _int8_of_fp32_export,
         says=("no int8 graph (it has fp32); re-export with --precision int8",)),
]


CASES = TAMPERED_CASES + EXPORT_CASES + STATE_CASES + OPTION_CASES


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_model(case, assets, tmp_path):
    run_case(case, tmp_path, assets)


def _no_constant(name):
    raise ValueError(f"{name} in the JSON output")


def _one_token_decoder_document(scene):
    checkpoint = shutil.copy(scene.assets.decoder, scene.work / "dec.pt")
    return [checkpoint, scene.text("one.txt", "a"), "--json", "--threads", "1"]


def test_json_output_is_strict_for_a_document_of_one_token(assets, tmp_path):
    case = Case("run-json-one-token-decoder-document", "rmt-run", _one_token_decoder_document,
                code=0)
    report = json.loads(run_case(case, tmp_path, assets).stdout, parse_constant=_no_constant)
    assert report["tokens"] == 1
    assert report["perplexity"] is None or math.isfinite(report["perplexity"])


def test_the_crafted_state_is_what_rmt_run_saves(assets, tmp_path):
    """The state the crafted cases start from resumes to the uninterrupted answer, so
    each case fails for its one change."""
    for name in ("resumed", "plain"):
        (tmp_path / name).mkdir()
    resumed = run_case(STATE_CASES[0], tmp_path / "resumed", assets)
    plain = run_case(Case("run", "rmt-run", _run_export, code=0), tmp_path / "plain", assets)
    first, second = (json.loads(p.stdout) for p in (resumed, plain))
    assert first["label"] == second["label"]
    assert first["logits"] == pytest.approx(second["logits"], abs=1e-5)


def test_export_threads_beyond_the_host_are_refused_before_any_work(assets, tmp_path):
    case = Case("export-threads-100000", "rmt-export",
                lambda scene: [scene.checkpoint(), "-o", "out", "-q", "--threads", "100000"],
                says=("threads 100000", f"this host has {CPUS} CPU"), absent=("out",))
    run_case(case, tmp_path, assets)
