"""The authors' published Llama layouts (ARMT wrapper, plain RMT ``MemoryCell``, peft
LoRA) read into plain Hugging Face names: the merge checked against ``W + alpha/r B A``
computed independently, both ARMT namings alike, every refusal one CheckpointError."""


import pytest
import torch
from conftest import write_gpt2_folder
from published_layouts import (
    ALPHA,
    D_MEM,
    MEM_TOKENS,
    PEFT,
    RANK,
    llama_config,
    published_state,
    write_llama_base,
    write_published,
)
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from benchmarks.authors_armt import authors_armt
from rmt_deploy.errors import CheckpointError
from rmt_deploy.model.armt import generate_armt, run_armt
from rmt_deploy.model.armt_checkpoint import MAP_KEYS, read_published
from rmt_deploy.model.checkpoint import (
    AUTHORS_ARMT,
    AUTHORS_GPT2,
    AuthorsOptions,
    load_checkpoint,
)
from rmt_deploy.model.loop import run_decoder

torch.set_num_threads(1)
DOCS = [[(7 * i) % 58 for i in range(17)], [4, 9, 16]]


def _read(tmp_path, state, alpha=ALPHA):
    return read_published(tmp_path / "model.safetensors", state, alpha)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("naming", ["base", "shared", "both"])
def test_armt_lora_merged_equals_w_plus_scaled_b_a(tmp_path, naming):
    state, expected, memory, maps = published_state(naming=naming)
    read = _read(tmp_path, state)
    assert set(read.base_state) == set(expected)
    assert all(_close(read.base_state[k], v) for k, v in expected.items())
    assert torch.equal(read.memory, memory)
    assert len(read.maps) == len(maps) and all(
        set(got) == set(MAP_KEYS) and all(torch.equal(got[k], want[k]) for k in MAP_KEYS)
        for got, want in zip(read.maps, maps, strict=True))
    assert (read.num_mem_tokens, read.d_mem, read.num_layers) == (MEM_TOKENS, D_MEM, 2)
    assert (read.lora.rank, read.lora.alpha, read.lora.modules) == (RANK, ALPHA, 4)


def test_both_namings_give_the_same_result(tmp_path):
    base = _read(tmp_path, published_state(naming="base")[0])
    shared = _read(tmp_path, published_state(naming="shared")[0])
    assert base.base_state.keys() == shared.base_state.keys()
    assert all(torch.equal(base.base_state[k], shared.base_state[k]) for k in base.base_state)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(base.maps, shared.maps, strict=True)
               for k in MAP_KEYS)


def test_merge_scales_by_alpha_over_rank(tmp_path):
    """Another alpha gives W + (alpha/r) B A with that alpha, not a fixed scale."""
    state, expected, _, _ = published_state()
    key = "model.layers.0.self_attn.q_proj.weight"
    lora_a = state[PEFT + "model.layers.0.layer.self_attn.q_proj.lora_A.default.weight"]
    lora_b = state[PEFT + "model.layers.0.layer.self_attn.q_proj.lora_B.default.weight"]
    base = state[PEFT + "model.layers.0.layer.self_attn.q_proj.base_layer.weight"]
    read = _read(tmp_path, state, alpha=8.0)
    want = (base.double() + (8.0 / RANK) * (lora_b.double() @ lora_a.double())).float()
    assert _close(read.base_state[key], want) and not _close(read.base_state[key],
                                                             expected[key])


def test_wrapper_config_gives_the_segment_size(tmp_path):
    published = write_published(tmp_path, config={"segment_size": 7, "max_n_segments": 4})
    state = published_state()[0]
    assert read_published(published.path, state, ALPHA).segment_size == 7


@pytest.mark.parametrize("lora", [True, False])
def test_plain_llama_rmt_loads_as_decoder(tmp_path, lora):
    """The published plain RMT (MemoryCell on Llama, peft LoRA or none) is a DecoderRMT
    whose weights are the merged ones; the segment size comes from config.json."""
    published = write_published(tmp_path / "ckpt", armt=False, lora=lora,
                                config={"segment_size": 6})
    options = AuthorsOptions(base_model=write_gpt2_folder(tmp_path / "base", "llama"),
                             lora_alpha=ALPHA if lora else None)
    loaded = load_checkpoint(published.path, options)
    assert loaded.format == AUTHORS_GPT2 and loaded.rmt.rmt_config.segment_size == 6
    state = loaded.rmt.state_dict()
    assert torch.equal(state["memory"], published.memory)
    assert all(_close(state[f"model.{k}"], v) for k, v in published.expected.items())
    assert (loaded.lora.to_dict() if lora else loaded.lora) == (
        {"merged": True, "rank": RANK, "alpha": ALPHA, "modules": 4} if lora else None)
    with torch.no_grad():
        run_decoder(loaded.rmt, DOCS)


def test_segment_size_option_overrides_the_wrapper_config(tmp_path):
    published = write_published(tmp_path / "ckpt", armt=False, config={"segment_size": 6})
    options = AuthorsOptions(base_model=write_gpt2_folder(tmp_path / "base", "llama"),
                             lora_alpha=ALPHA, segment_size=4)
    assert load_checkpoint(published.path, options).rmt.rmt_config.segment_size == 4


@pytest.mark.parametrize("naming", ["base", "shared"])
def test_a_published_armt_computes_what_the_authors_code_computes(tmp_path, naming):
    """The published file, loaded and LoRA-merged, against the authors' ARMT built from
    the independently merged weights: token logits, every layer's (A, z), greedy ids."""
    published = write_published(tmp_path / "ckpt", naming=naming, config={"segment_size": 6})
    options = AuthorsOptions(base_model=write_llama_base(tmp_path / "base"),
                             lora_alpha=ALPHA, armt_correction=False)
    loaded = load_checkpoint(published.path, options)
    assert loaded.format == AUTHORS_ARMT and loaded.lora.rank == RANK
    base = LlamaForCausalLM(llama_config()).eval()
    base.load_state_dict(published.expected, strict=False)
    authors = authors_armt(base, num_mem_tokens=published.memory.shape[0], d_mem=D_MEM,
                           segment_size=6, correction=False, memory=published.memory,
                           maps=published.maps)
    doc = torch.tensor([(5 * i + 2) % 50 for i in range(15)])  # 3 segments, the last short
    logits, state = run_armt(loaded.rmt, doc)
    with torch.no_grad():
        expected = authors(doc.view(1, -1))[0]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    for index, layer in enumerate(authors.memory_cell.layers):
        for ours, theirs in ((state[2 * index], layer.W_mem), (state[2 * index + 1], layer.z)):
            scale = float(theirs.abs().max())  # running sums: judged against their size
            assert float((ours - theirs).abs().max()) <= 1e-5 * scale, (index, scale)
    with torch.no_grad():
        ids = authors.generate(doc.view(1, -1), max_new_tokens=6, do_sample=False,
                               pad_token_id=0)[0].tolist()
    assert generate_armt(loaded.rmt, doc, 6) == ids


# ---------------------------------------------------------------- refusals


def _refused(tmp_path, state, *words, alpha=ALPHA):
    with pytest.raises(CheckpointError) as error:
        _read(tmp_path, state, alpha)
    message = str(error.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_lora_without_alpha(tmp_path):
    _refused(tmp_path, published_state()[0], "LoRA", "--lora-alpha", alpha=None)


def test_alpha_without_lora(tmp_path):
    _refused(tmp_path, published_state(lora=False)[0], "--lora-alpha", "no LoRA")


def test_missing_memory_map(tmp_path):
    state = published_state()[0]
    del state[PEFT + "model.layers.1.W_mk.weight"]
    _refused(tmp_path, state, "layer 1", "W_mk.weight", "memory maps")


def test_missing_memory_maps_of_a_wrapped_layer(tmp_path):
    state = published_state()[0]
    for name in MAP_KEYS:
        del state[PEFT + f"model.layers.0.{name}"]
    _refused(tmp_path, state, "layer 0", "memory maps")


def test_mixed_armt_and_plain_layers(tmp_path):
    armt, plain = published_state()[0], published_state(armt=False)[0]
    mixed = {**armt, **{k: v for k, v in plain.items() if ".layers.1." in k}}
    _refused(tmp_path, mixed, "mixes layouts")


def test_mixed_peft_and_plain_base(tmp_path):
    armt, plain = published_state()[0], published_state(lora=False)[0]
    _refused(tmp_path, {**armt, "memory_cell.model.model.norm.weight":
                        plain["memory_cell.model.model.norm.weight"]}, "mixes layouts")


def test_two_namings_that_disagree(tmp_path):
    state = published_state(naming="both")[0]
    key = "memory_cell.layers.0.layer.mlp.up_proj.weight"
    state[key] = state[key] + 1
    _refused(tmp_path, state, key, "different values")


@pytest.mark.parametrize("name,shape", [("W_mq.weight", (D_MEM + 1, 32)),
                                        ("W_mv.weight", (32, 31)), ("W_mb.bias", (2,))])
def test_map_shapes_that_disagree(tmp_path, name, shape):
    state = published_state()[0]
    state[PEFT + f"model.layers.1.{name}"] = torch.zeros(shape)
    _refused(tmp_path, state, "shapes disagree", f"layer 1's {name}")


@pytest.mark.parametrize("part,change", [("lora_B.default", (0, 1)),  # [out, r + 1]
                                         ("lora_A.default", (0, 1)),  # [r, in + 1]
                                         ("lora_B.default", (1, 0))])  # [out + 1, r]
def test_lora_shapes_that_disagree(tmp_path, part, change):
    state = published_state()[0]
    key = PEFT + f"model.layers.0.layer.self_attn.v_proj.{part}.weight"
    rows, columns = state[key].shape
    state[key] = torch.zeros(rows + change[0], columns + change[1])
    _refused(tmp_path, state, "shapes of", "v_proj", "disagree")


def test_memory_width_that_disagrees(tmp_path):
    state = published_state()[0]
    state["memory_cell.memory"] = torch.zeros(MEM_TOKENS, 31)
    _refused(tmp_path, state, "shapes disagree", "embeddings")


def test_incomplete_lora(tmp_path):
    state = published_state()[0]
    del state[PEFT + "model.layers.1.layer.self_attn.q_proj.lora_B.default.weight"]
    _refused(tmp_path, state, "incomplete", "lora_B")


def test_bad_wrapper_config(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2")
    _refused(tmp_path, published_state()[0], "config.json", "JSON")


def test_safetensors_of_a_published_layout_is_recognised(tmp_path):
    """A plain safetensors state dict (no rmt-deploy header) with memory_cell.* keys is
    an authors' layout, not an unknown one."""
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in published_state()[0].items()}, str(path))
    with pytest.raises(CheckpointError, match="--base-model"):
        load_checkpoint(path, AuthorsOptions(lora_alpha=ALPHA))


@pytest.fixture
def factory_calls(monkeypatch):
    """A recording stand-in for ``armt_from_base``, so that what the loader passes it is
    checked on its own."""
    from rmt_deploy.model import checkpoint

    calls = []

    def record(base, **kwargs):
        calls.append((base, kwargs))
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(checkpoint, "armt_from_base", record)
    return calls


def test_armt_factory_gets_what_the_file_holds(tmp_path, factory_calls):
    """The one call to armt_from_base passes the merged base, the memory, every layer's
    maps, d_mem, config.json's segment size and the options."""
    calls = factory_calls
    published = write_published(tmp_path / "ckpt", naming="shared", config={"segment_size": 6})
    options = AuthorsOptions(base_model=write_gpt2_folder(tmp_path / "base", "llama"),
                             lora_alpha=ALPHA, armt_correction=False)
    loaded = load_checkpoint(published.path, options)
    (base, kwargs), = calls
    assert loaded.format == AUTHORS_ARMT and loaded.lora.rank == RANK
    state = base.state_dict()
    assert all(_close(state[k], v) for k, v in published.expected.items())
    assert torch.equal(kwargs.pop("memory"), published.memory)
    maps = kwargs.pop("maps")
    assert all(torch.equal(got[k], want[k]) for got, want in zip(maps, published.maps,
                                                                  strict=True) for k in MAP_KEYS)
    assert kwargs.pop("special").eos == 59
    assert kwargs == {"num_mem_tokens": MEM_TOKENS, "d_mem": D_MEM, "segment_size": 6,
                      "correction": False, "sliding_window": False}


@pytest.mark.parametrize("armt", [True, False])
def test_hub_saved_checkpoint_with_a_tied_head(tmp_path, armt, factory_calls):
    """Saved as the wrapper saves it (shared tensors once: the layers as
    memory_cell.layers.N.*, the tied head as lm_head only, the dropped names in the
    metadata), on a base whose head is its input embedding: every weight is found."""
    published = write_published(tmp_path / "ckpt", armt=armt, naming="both", tied=True,
                                hub_save=True, config={"segment_size": 6})
    with safe_open(str(published.path), "pt") as handle:
        stored = set(handle.keys())  # noqa: SIM118
    assert PEFT + "model.embed_tokens.weight" not in stored
    assert not armt or not any(k.startswith(PEFT + "model.layers.") for k in stored)
    options = AuthorsOptions(base_model=write_llama_base(tmp_path / "base", tied=True),
                             lora_alpha=ALPHA)
    loaded = load_checkpoint(published.path, options)
    if armt:
        (base, _), = factory_calls
        state = base.state_dict()
    else:
        state = {k[len("model."):]: v for k, v in loaded.rmt.state_dict().items()
                 if k.startswith("model.")}
    assert all(_close(state[k], v) for k, v in published.expected.items())


def test_tied_head_stored_once_without_a_record(tmp_path):
    """A file that holds the tied head once and does not say which name it dropped (e.g.
    re-saved): the head fills the tied input embedding."""
    def drop_embeddings(state):
        del state[PEFT + "model.embed_tokens.weight"]

    published = write_published(tmp_path / "ckpt", armt=False, tied=True,
                                change=drop_embeddings, config={"segment_size": 6})
    options = AuthorsOptions(base_model=write_llama_base(tmp_path / "base", tied=True),
                             lora_alpha=ALPHA)
    state = load_checkpoint(published.path, options).rmt.state_dict()
    assert torch.equal(state["model.model.embed_tokens.weight"],
                       published.expected["model.embed_tokens.weight"])


@pytest.mark.parametrize("option", [{"armt_correction": False}, {"sliding_window": True}])
def test_armt_options_on_a_plain_rmt(tmp_path, option):
    published = write_published(tmp_path / "ckpt", armt=False, lora=False)
    options = AuthorsOptions(base_model=write_llama_base(tmp_path / "base"), **option)
    with pytest.raises(CheckpointError, match="apply to ARMT checkpoints only"):
        load_checkpoint(published.path, options)


def test_sliding_window_reaches_the_armt(tmp_path):
    """--sliding-window builds the ARMT with the window: its config says so and its step
    carries the window (the loader refused it before the window was exported)."""
    published = write_published(tmp_path / "ckpt", config={"segment_size": 6})
    options = AuthorsOptions(base_model=write_gpt2_folder(tmp_path / "base", "llama"),
                             lora_alpha=ALPHA, sliding_window=True)
    rmt = load_checkpoint(published.path, options).rmt
    assert rmt.sliding_window and rmt.rmt_config.sliding_window
    assert len(rmt.zero_state(1)) == 2 * rmt.layers + 3  # (A, z)s, started, the window


@pytest.mark.parametrize("armt", [True, False])
def test_a_loaded_model_does_not_keep_the_checkpoint_mapped(tmp_path, armt):
    """Safetensors' tensors are views of the whole file, mapped: a parameter kept as read
    (the memory) held every byte of it in the export's memory (5.2 GB for a 1B model
    beside its own copy of the weights)."""
    published = write_published(tmp_path / "ckpt", armt=armt, config={"segment_size": 6})
    options = AuthorsOptions(base_model=write_gpt2_folder(tmp_path / "base", "llama"),
                             lora_alpha=ALPHA)
    loaded = load_checkpoint(published.path, options)
    with open("/proc/self/maps") as maps:
        mapped = [line for line in maps if str(published.path) in line]
    assert not mapped, mapped
    assert loaded.rmt.memory.shape == (MEM_TOKENS, published.memory.shape[1])
