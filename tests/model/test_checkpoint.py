"""Checkpoint formats: the project's own (.pt and .safetensors), the authors' BERT
``model_best.pth`` and GPT-2 ``pytorch_model.bin`` built here exactly as their code saves
them, conversion between them, and every bad file turned into a one-line CheckpointError."""

import hashlib
import os
import pathlib
import pickle

import pytest
import torch
from conftest import make_decoder, make_encoder, write_bert_folder, write_gpt2_folder
from safetensors.torch import load_file, save_file

from rmt_deploy.errors import CheckpointError
from rmt_deploy.model import checkpoint as ckpt
from rmt_deploy.model.checkpoint import AuthorsOptions, load_checkpoint, save_checkpoint
from rmt_deploy.model.loop import run_decoder, run_encoder

torch.set_num_threads(1)

#: Documents of several lengths (several segments, one short one, special tokens inside).
ENCODER_DOCS = [list(range(5, 45)), [2, *range(10, 27), 3, 0], list(range(6, 12))]
DECODER_DOCS = [[(7 * i) % 58 for i in range(23)], list(range(30, 37)), [4, 9, 16]]
LABELS = ("a", "b", "c")
TOKENIZER = '{"version": "1.0", "model": {"type": "WordLevel"}}'
WORD_EMBEDDINGS = "model.bert.embeddings.word_embeddings.weight"


# ---------------------------------------------------------------- helpers


def same_outputs(a, b) -> None:
    """Both RMTs give bit-identical logits and final memory on the same documents."""
    with torch.no_grad():
        if a.rmt_config.is_encoder:
            ra, rb = run_encoder(a, ENCODER_DOCS), run_encoder(b, ENCODER_DOCS)
            assert torch.equal(ra.logits, rb.logits)
        else:
            ra, rb = run_decoder(a, DECODER_DOCS), run_decoder(b, DECODER_DOCS)
            assert len(ra.logits) == len(rb.logits) == len(DECODER_DOCS)
            for la, lb in zip(ra.logits, rb.logits, strict=True):
                assert torch.equal(la, lb)
        assert ra.segments == rb.segments and max(ra.segments) > 1
        assert torch.equal(ra.memory, rb.memory)


def same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def expect_error(path, *fragments, options=None) -> str:
    """Loading raises CheckpointError (nothing else) with a one-line message that holds
    every fragment."""
    try:
        load_checkpoint(path, options)
    except CheckpointError as error:
        message = str(error)
    except Exception as error:  # any other type is the bug under test
        pytest.fail(f"{type(error).__name__} escaped instead of CheckpointError: {error}")
    else:
        pytest.fail(f"{path} loaded without error")
    assert "\n" not in message and message.isprintable(), repr(message)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def own_payload(tmp_path, rmt):
    """The dict inside a valid own .pt, to be damaged by a test."""
    path = save_checkpoint(rmt, tmp_path / "valid.pt", TOKENIZER)
    return torch.load(path, weights_only=True)


def authors_bert_state(rmt, mem_token_ids: bool = True) -> dict:
    """``model_state_dict`` as the 1M-token paper's RMT wrapper saves it."""
    state = rmt.state_dict()
    assert {key.split(".")[1] for key in state} == {"bert", "classifier"}
    m, vocab = rmt.rmt_config.num_mem_tokens, rmt.rmt_config.vocab_size
    sd = {"cls_token": torch.tensor([2]), "sep_token": torch.tensor([3])}
    if mem_token_ids:
        sd["mem_token_ids"] = torch.arange(vocab - m, vocab)
    sd.update({key: value.clone() for key, value in state.items()})
    sd["model.embeddings.weight"] = sd[WORD_EMBEDDINGS]  # the duplicate alias
    sd["model.bert.embeddings.position_ids"] = torch.arange(32).unsqueeze(0)
    return sd


def save_authors_bert(folder, sd) -> pathlib.Path:
    path = folder / "model_best.pth"
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}
    torch.save({"model_state_dict": sd, "optimizer_state_dict": optimizer, "epoch": 3}, path)
    return path


def authors_gpt2_state(rmt) -> dict:
    """BABILong's flat ``pytorch_model.bin`` state dict."""
    state = {f"memory_cell.{key}": value.clone() for key, value in rmt.state_dict().items()}
    assert "memory_cell.memory" in state and "memory_cell.model.lm_head.weight" in state
    return state


def save_authors_gpt2(folder, sd) -> pathlib.Path:
    path = folder / "pytorch_model.bin"
    torch.save(sd, path)
    return path


def bert_options(tmp_path, **kwargs) -> AuthorsOptions:
    values = {"base_model": write_bert_folder(tmp_path / "base"), "input_size": 16,
              "labels": LABELS}
    return AuthorsOptions(**{**values, **kwargs})


def gpt2_options(tmp_path, **kwargs) -> AuthorsOptions:
    values = {"base_model": write_gpt2_folder(tmp_path / "base"), "segment_size": 5}
    return AuthorsOptions(**{**values, **kwargs})


# ---------------------------------------------------------------- own format


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("variant", ["encoder", "decoder"])
def test_own_format_round_trip(tmp_path, suffix, variant):
    rmt = make_encoder(seed=1) if variant == "encoder" else make_decoder(seed=1)
    folder = tmp_path / "out"
    path = save_checkpoint(rmt, folder / f"model{suffix}", TOKENIZER)
    assert path == folder / f"model{suffix}"
    assert os.listdir(folder) == [path.name]  # atomic: no temp file left behind

    loaded = load_checkpoint(path)  # no options needed
    assert loaded.format == "rmt-deploy"
    assert loaded.rmt.rmt_config == rmt.rmt_config
    assert loaded.tokenizer_json == TOKENIZER
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(loaded.sha256) == 64 and int(loaded.sha256, 16) >= 0
    assert loaded.base_config["model_type"] == rmt.model.config.model_type
    assert loaded.base_config["vocab_size"] == rmt.model.config.vocab_size
    assert not loaded.rmt.training
    assert type(loaded.rmt) is type(rmt)
    same_weights(loaded.rmt, rmt)
    same_outputs(loaded.rmt, rmt)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_own_format_without_tokenizer_gives_none(tmp_path, suffix):
    path = save_checkpoint(make_decoder(), tmp_path / f"m{suffix}", None)
    assert load_checkpoint(path).tokenizer_json is None


def test_decoder_round_trip_keeps_a_trained_memory_and_tied_head(tmp_path):
    rmt = make_decoder(seed=2, num_mem_tokens=3)
    with torch.no_grad():
        rmt.memory.mul_(3.0).add_(0.5)
    loaded = load_checkpoint(save_checkpoint(rmt, tmp_path / "m.safetensors", TOKENIZER)).rmt
    assert torch.equal(loaded.memory, rmt.memory)
    head, wte = loaded.model.lm_head.weight, loaded.model.transformer.wte.weight
    assert head.data_ptr() == wte.data_ptr()  # still tied after loading
    same_outputs(loaded, rmt)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_saving_over_a_file_is_atomic_when_writing_fails(tmp_path, suffix, monkeypatch):
    path = save_checkpoint(make_encoder(seed=1), tmp_path / f"m{suffix}", TOKENIZER)
    before = path.read_bytes()

    def fail_half_way(obj, target, *args, **kwargs):
        pathlib.Path(target).write_bytes(b"partial")
        raise OSError("disk full")

    if suffix == ".pt":
        monkeypatch.setattr(torch, "save", fail_half_way)
    else:
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", fail_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(make_encoder(seed=2), path, TOKENIZER)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]
    monkeypatch.undo()
    same_outputs(load_checkpoint(path).rmt, make_encoder(seed=1))


def test_saved_file_has_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = save_checkpoint(make_decoder(), tmp_path / "m.pt", None)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_saving_creates_missing_folders(tmp_path):
    path = save_checkpoint(make_decoder(), tmp_path / "a" / "b" / "m.safetensors", None)
    assert path.is_file() and load_checkpoint(path).format == "rmt-deploy"


# ---------------------------------------------------------------- authors' BERT


@pytest.mark.parametrize("num_mem_tokens", [3, 5])
@pytest.mark.parametrize("with_mem_token_ids", [True, False])
def test_authors_bert_checkpoint_loads_and_matches(tmp_path, num_mem_tokens, with_mem_token_ids):
    source = make_encoder(seed=4, num_mem_tokens=num_mem_tokens)
    sd = authors_bert_state(source, mem_token_ids=with_mem_token_ids)
    path = save_authors_bert(tmp_path, sd)
    loaded = load_checkpoint(path, bert_options(tmp_path))
    assert loaded.format == "authors-bert"
    assert loaded.rmt.rmt_config.num_mem_tokens == num_mem_tokens
    assert loaded.rmt.rmt_config == source.rmt_config
    assert loaded.rmt.rmt_config.mem_token_ids == tuple(range(50, 50 + num_mem_tokens))
    assert loaded.base_config["vocab_size"] == 50 + num_mem_tokens
    assert loaded.tokenizer_json and '"[CLS]"' in loaded.tokenizer_json
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not loaded.rmt.training
    same_weights(loaded.rmt, source)
    same_outputs(loaded.rmt, source)


def test_authors_bert_paper_labels_by_default(tmp_path):
    source = make_encoder(seed=5, labels=ckpt.PAPER_LABELS)
    path = save_authors_bert(tmp_path, authors_bert_state(source))
    options = AuthorsOptions(base_model=write_bert_folder(tmp_path / "base"), input_size=16)
    loaded = load_checkpoint(path, options)
    assert loaded.rmt.rmt_config.labels == ckpt.PAPER_LABELS
    same_outputs(loaded.rmt, source)


# ---------------------------------------------------------------- authors' GPT-2


@pytest.mark.parametrize("num_mem_tokens", [2, 4])
@pytest.mark.parametrize("tied_head_saved", [True, False])
def test_authors_gpt2_checkpoint_loads_and_matches(tmp_path, num_mem_tokens, tied_head_saved):
    source = make_decoder(seed=6, num_mem_tokens=num_mem_tokens)
    sd = authors_gpt2_state(source)
    if not tied_head_saved:
        del sd["memory_cell.model.lm_head.weight"]
    path = save_authors_gpt2(tmp_path, sd)
    loaded = load_checkpoint(path, gpt2_options(tmp_path))
    assert loaded.format == "authors-gpt2"
    assert loaded.rmt.rmt_config.num_mem_tokens == num_mem_tokens
    assert loaded.rmt.rmt_config == source.rmt_config
    assert torch.equal(loaded.rmt.memory, source.memory)
    assert loaded.tokenizer_json and "<|endoftext|>" in loaded.tokenizer_json
    assert not loaded.rmt.training
    same_weights(loaded.rmt, source)
    same_outputs(loaded.rmt, source)


# ---------------------------------------------------------------- conversion


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_authors_bert_converts_to_own_format(tmp_path, suffix):
    source = make_encoder(seed=7, num_mem_tokens=4)
    authors = load_checkpoint(save_authors_bert(tmp_path, authors_bert_state(source)),
                              bert_options(tmp_path))
    path = save_checkpoint(authors.rmt, tmp_path / "out" / f"converted{suffix}",
                           authors.tokenizer_json)
    own = load_checkpoint(path)
    assert own.format == "rmt-deploy"
    assert own.rmt.rmt_config == authors.rmt.rmt_config == source.rmt_config
    assert own.tokenizer_json == authors.tokenizer_json
    assert own.base_config["vocab_size"] == 54 and len(own.base_config["id2label"]) == 3
    same_outputs(own.rmt, source)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_authors_gpt2_converts_to_own_format(tmp_path, suffix):
    source = make_decoder(seed=8, num_mem_tokens=3)
    authors = load_checkpoint(save_authors_gpt2(tmp_path, authors_gpt2_state(source)),
                              gpt2_options(tmp_path))
    path = save_checkpoint(authors.rmt, tmp_path / "out" / f"converted{suffix}",
                           authors.tokenizer_json)
    own = load_checkpoint(path)
    assert own.format == "rmt-deploy"
    assert own.rmt.rmt_config == source.rmt_config
    assert own.tokenizer_json == authors.tokenizer_json
    same_outputs(own.rmt, source)


# ---------------------------------------------------------------- unreadable files


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.pt", "nope.pt", "no such file")
    expect_error(tmp_path / "nope.safetensors", "no such file")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".pth"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    expect_error(path, "empty")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_directory(tmp_path, suffix):
    folder = tmp_path / f"model{suffix}"
    folder.mkdir()
    expect_error(folder, "is a directory")


def test_truncated_torch_file(tmp_path):
    data = save_checkpoint(make_encoder(), tmp_path / "ok.pt", TOKENIZER).read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2])
    expect_error(path, "cut.pt", "not a readable PyTorch checkpoint", "truncated or corrupt")


def test_truncated_safetensors_file(tmp_path):
    data = save_checkpoint(make_encoder(), tmp_path / "ok.safetensors", TOKENIZER).read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    expect_error(path, "cut.safetensors", "not a readable safetensors file")


@pytest.mark.parametrize(
    "data",
    [
        bytes(range(256)) * 8,
        b"hello, this is not a checkpoint\n" * 20,
        b"PK\x03\x04" + b"\x00" * 200,
        b"\x80\x02}q\x00",  # a pickle that stops in the middle
        b"{not json",
    ],
    ids=["binary", "text", "zip-header", "cut-pickle", "text-short"],
)
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_garbage_bytes(tmp_path, data, suffix):
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(data)
    message = expect_error(path, "junk")
    assert "not a readable" in message and not message.endswith(": ")
    assert "code" not in message  # garbage is not reported as a code-running pickle


class _RunsCode:
    """Unpickling this calls ``Path.touch(sentinel)``: code from the file."""

    def __init__(self, sentinel: pathlib.Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (pathlib.Path.touch, (self.sentinel,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle-2", "pickle-default"])
def test_a_pickle_that_would_run_code_is_refused_and_not_run(tmp_path, writer):
    canary = tmp_path / "CANARY"
    pickle.loads(pickle.dumps(_RunsCode(canary)))
    assert canary.exists(), "the payload must really run code when unpickled unsafely"

    sentinel = tmp_path / "SENTINEL"
    payload = {"model_state_dict": {}, "epoch": 3, "hook": _RunsCode(sentinel)}
    path = tmp_path / "model_best.pth"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        protocol = 2 if writer == "pickle-2" else pickle.DEFAULT_PROTOCOL
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=protocol)
    message = expect_error(path, "model_best.pth")
    assert not sentinel.exists()
    if writer != "pickle-default":  # the torch loader sees the global it refuses
        assert "refused" in message and "never code" in message and "GLOBAL" in message
    else:  # protocol 4+ framing: the weights-only unpickler stops before any global
        assert "not a readable PyTorch checkpoint" in message
    assert "\x1b" not in message


def test_not_a_dict(tmp_path):
    path = tmp_path / "t.pt"
    torch.save(torch.zeros(3), path)
    expect_error(path, "holds a Tensor", "not a dict")


def test_unknown_layout(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weights": {"w": torch.zeros(2)}, "step": 7}, path)
    expect_error(path, "unrecognized checkpoint layout", "step", "weights")


def test_safetensors_without_header_is_unknown_layout(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    expect_error(path, "unrecognized checkpoint layout")


# ---------------------------------------------------------------- own format, bad content


def test_own_missing_key(tmp_path):
    payload = own_payload(tmp_path, make_encoder())
    del payload["state_dict"]["model.classifier.bias"]
    torch.save(payload, tmp_path / "bad.pt")
    message = expect_error(tmp_path / "bad.pt", "missing keys", "model.classifier.bias")
    assert "unexpected" not in message and "wrong shapes" not in message


def test_own_unexpected_key(tmp_path):
    payload = own_payload(tmp_path, make_decoder())
    payload["state_dict"]["model.extra.weight"] = torch.zeros(2)
    torch.save(payload, tmp_path / "bad.pt")
    message = expect_error(tmp_path / "bad.pt", "unexpected keys", "model.extra.weight")
    assert "missing" not in message


def test_own_wrong_shape(tmp_path):
    payload = own_payload(tmp_path, make_encoder())
    payload["state_dict"]["model.classifier.weight"] = torch.zeros(4, 32)
    torch.save(payload, tmp_path / "bad.pt")
    expect_error(tmp_path / "bad.pt", "wrong shapes", "model.classifier.weight",
                 "(4, 32)", "(3, 32)")


def test_own_safetensors_bad_weights(tmp_path):
    path = save_checkpoint(make_encoder(), tmp_path / "ok.safetensors", TOKENIZER)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    weights = load_file(str(path))
    del weights["model.bert.pooler.dense.bias"]
    weights["model.bert.embeddings.position_embeddings.weight"] = torch.zeros(30, 32)
    save_file(weights, str(tmp_path / "bad.safetensors"), metadata=meta)
    expect_error(tmp_path / "bad.safetensors", "missing keys model.bert.pooler.dense.bias",
                 "model.bert.embeddings.position_embeddings.weight", "(30, 32)", "(32, 32)")


@pytest.mark.parametrize("version", ["2", "0", None])
def test_own_wrong_format_version(tmp_path, version):
    payload = own_payload(tmp_path, make_decoder())
    if version is None:
        del payload["format_version"]
    else:
        payload["format_version"] = version
    torch.save(payload, tmp_path / "bad.pt")
    expect_error(tmp_path / "bad.pt", f"format version {version}", "upgrade rmt-deploy")


def test_own_safetensors_wrong_format_version(tmp_path):
    path = save_checkpoint(make_decoder(), tmp_path / "ok.safetensors", None)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata())
    meta["format_version"] = "7"
    save_file(load_file(str(path)), str(tmp_path / "new.safetensors"), metadata=meta)
    expect_error(tmp_path / "new.safetensors", "format version 7")


@pytest.mark.parametrize(
    "damage",
    [
        {"rmt_config": "{not json"},
        {"rmt_config": '{"variant": "encoder"}'},
        {"rmt_config": '{"bogus": 1}'},
        {"rmt_config": "[1, 2]"},
        {"base_config": "{}"},
        {"base_config": None},
        {"state_dict": None},
    ],
    ids=["bad-json", "incomplete", "unknown-key", "list", "no-model-type", "none", "no-sd"],
)
def test_own_damaged_header(tmp_path, damage):
    payload = own_payload(tmp_path, make_encoder())
    payload.update(damage)
    torch.save(payload, tmp_path / "bad.pt")
    expect_error(tmp_path / "bad.pt")


def test_own_non_tensor_value(tmp_path):
    payload = own_payload(tmp_path, make_encoder())
    payload["state_dict"]["model.classifier.bias"] = [0.0, 0.0, 0.0]
    torch.save(payload, tmp_path / "bad.pt")
    expect_error(tmp_path / "bad.pt", "not tensors", "model.classifier.bias")


# ---------------------------------------------------------------- authors' files, bad content


def test_authors_bert_without_base_model(tmp_path):
    path = save_authors_bert(tmp_path, authors_bert_state(make_encoder()))
    expect_error(path, "does not record its base model", "--base-model")
    expect_error(path, "--base-model", options=AuthorsOptions(input_size=16, labels=LABELS))


def test_authors_gpt2_without_base_model(tmp_path):
    path = save_authors_gpt2(tmp_path, authors_gpt2_state(make_decoder()))
    expect_error(path, "--base-model")


@pytest.mark.parametrize("variant", ["bert", "gpt2"])
def test_base_folder_without_config_json(tmp_path, variant):
    if variant == "bert":
        path = save_authors_bert(tmp_path, authors_bert_state(make_encoder()))
        folder = write_bert_folder(tmp_path / "base")
    else:
        path = save_authors_gpt2(tmp_path, authors_gpt2_state(make_decoder()))
        folder = write_gpt2_folder(tmp_path / "base")
    (folder / "config.json").unlink()
    expect_error(path, "--base-model", "no config.json",
                 options=AuthorsOptions(base_model=folder, input_size=16, labels=LABELS))
    expect_error(path, "no config.json",
                 options=AuthorsOptions(base_model=tmp_path / "absent", labels=LABELS))


def test_authors_bert_labels_count_mismatch(tmp_path):
    path = save_authors_bert(tmp_path, authors_bert_state(make_encoder()))
    expect_error(path, "3 outputs", "2 labels", "--labels",
                 options=bert_options(tmp_path, labels=("a", "b")))
    # the default (the paper's six labels) does not fit a 3-class model either
    expect_error(path, "--labels", options=AuthorsOptions(base_model=tmp_path / "base",
                                                           input_size=16))


@pytest.mark.parametrize("num_mem_tokens, input_size", [(3, 6), (5, 8), (5, 4)])
def test_authors_bert_input_size_too_small(tmp_path, num_mem_tokens, input_size):
    sd = authors_bert_state(make_encoder(num_mem_tokens=num_mem_tokens))
    path = save_authors_bert(tmp_path, sd)
    expect_error(path, "--input-size", options=bert_options(tmp_path, input_size=input_size))


@pytest.mark.parametrize(
    "name, ids, shown",
    [("cls_token", [101], "101"), ("sep_token", [102], "102"), ("cls_token", [], "[]"),
     ("sep_token", [3, 3], "[3, 3]")],
)
def test_authors_bert_from_another_base_model(tmp_path, name, ids, shown):
    sd = authors_bert_state(make_encoder())
    sd[name] = torch.tensor(ids, dtype=torch.long)
    path = save_authors_bert(tmp_path, sd)
    expect_error(path, name, f"id {shown} differs", "--base-model",
                 options=bert_options(tmp_path))


def test_authors_bert_missing_unexpected_and_misshapen_keys(tmp_path):
    sd = authors_bert_state(make_encoder())
    del sd["model.bert.encoder.layer.1.output.dense.bias"]
    sd["model.bert.extra.weight"] = torch.zeros(1)
    sd["model.bert.pooler.dense.weight"] = torch.zeros(32, 31)
    path = save_authors_bert(tmp_path, sd)
    expect_error(path, "missing keys model.bert.encoder.layer.1.output.dense.bias",
                 "unexpected keys model.bert.extra.weight",
                 "model.bert.pooler.dense.weight (file (32, 31), model (32, 32))",
                 options=bert_options(tmp_path))


def test_authors_bert_state_dict_not_a_dict(tmp_path):
    path = tmp_path / "model_best.pth"
    torch.save({"model_state_dict": [torch.zeros(2)], "epoch": 1}, path)
    expect_error(path, "model_state_dict", options=bert_options(tmp_path))


def test_authors_bert_without_embeddings(tmp_path):
    sd = {k: v for k, v in authors_bert_state(make_encoder(), mem_token_ids=False).items()
          if "word_embeddings" not in k}
    path = save_authors_bert(tmp_path, sd)
    expect_error(path, "word_embeddings", options=bert_options(tmp_path))


@pytest.mark.parametrize(
    "key, value",
    [
        ("mem_token_ids", [50, 51, 52]),
        ("cls_token", 2),
        ("sep_token", "[SEP]"),
        ("model.classifier.weight", [[0.0] * 32] * 3),
        ("model.bert.pooler.dense.bias", None),
    ],
)
def test_authors_bert_non_tensor_value(tmp_path, key, value):
    sd = authors_bert_state(make_encoder())
    sd[key] = value
    path = save_authors_bert(tmp_path, sd)
    expect_error(path, key, "not", options=bert_options(tmp_path))


def test_authors_bert_word_embeddings_not_a_tensor(tmp_path):
    sd = authors_bert_state(make_encoder(), mem_token_ids=False)
    sd[WORD_EMBEDDINGS] = "oops"
    path = save_authors_bert(tmp_path, sd)
    expect_error(path, WORD_EMBEDDINGS, options=bert_options(tmp_path))


def test_authors_gpt2_missing_unexpected_and_misshapen_keys(tmp_path):
    sd = authors_gpt2_state(make_decoder())
    del sd["memory_cell.model.transformer.ln_f.bias"]
    sd["memory_cell.model.transformer.extra"] = torch.zeros(1)
    sd["memory_cell.model.transformer.wpe.weight"] = torch.zeros(65, 32)
    path = save_authors_gpt2(tmp_path, sd)
    expect_error(path, "missing keys model.transformer.ln_f.bias",
                 "unexpected keys model.transformer.extra",
                 "model.transformer.wpe.weight (file (65, 32), model (64, 32))",
                 options=gpt2_options(tmp_path))


def test_authors_gpt2_missing_memory(tmp_path):
    sd = authors_gpt2_state(make_decoder())
    del sd["memory_cell.memory"]
    path = save_authors_gpt2(tmp_path, sd)
    expect_error(path, "memory_cell.memory", options=gpt2_options(tmp_path))


def test_authors_gpt2_stray_top_level_key(tmp_path):
    sd = authors_gpt2_state(make_decoder())
    sd["optimizer"] = {"lr": 1.0}
    path = save_authors_gpt2(tmp_path, sd)
    expect_error(path, "unexpected keys", "optimizer", options=gpt2_options(tmp_path))


@pytest.mark.parametrize("memory", [torch.zeros(2, 32, 1), torch.zeros(32), [[0.0] * 32] * 2])
def test_authors_gpt2_bad_memory(tmp_path, memory):
    sd = authors_gpt2_state(make_decoder())
    sd["memory_cell.memory"] = memory
    path = save_authors_gpt2(tmp_path, sd)
    expect_error(path, "memory_cell.memory", options=gpt2_options(tmp_path))


def test_authors_gpt2_memory_of_the_wrong_width(tmp_path):
    sd = authors_gpt2_state(make_decoder())
    sd["memory_cell.memory"] = torch.zeros(2, 16)
    path = save_authors_gpt2(tmp_path, sd)
    expect_error(path, "memory", "(2, 16)", "(2, 32)", options=gpt2_options(tmp_path))


def test_authors_gpt2_non_tensor_weight(tmp_path):
    sd = authors_gpt2_state(make_decoder())
    sd["memory_cell.model.transformer.ln_f.weight"] = [1.0] * 32
    path = save_authors_gpt2(tmp_path, sd)
    expect_error(path, "not tensors", "model.transformer.ln_f.weight",
                 options=gpt2_options(tmp_path))


def test_authors_gpt2_segment_size_must_be_positive(tmp_path):
    path = save_authors_gpt2(tmp_path, authors_gpt2_state(make_decoder()))
    expect_error(path, "segment", options=gpt2_options(tmp_path, segment_size=0))
