"""Tiny random RMTs shared by the tests (no downloads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

#: The CLI measures the default backend; not here (reproducible, nothing cached in the home
#: folder); tests/runtime/test_selection.py measures with stand-in timings.
os.environ["RMT_DEPLOY_MEASURE"] = "0"

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rmt_deploy.model.base import build_decoder_base, build_encoder_base  # noqa: E402
from rmt_deploy.model.factory import (  # noqa: E402
    SpecialTokens,
    decoder_from_base,
    encoder_from_base,
)

BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(45)]
BERT_SPECIAL = SpecialTokens(pad=0, cls=2, sep=3)
GPT2_VOCAB = 60
GPT2_EOS = 59


def tiny_bert_config(num_labels: int = 3) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=len(BERT_WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
    )


def tiny_gpt2_config() -> transformers.GPT2Config:
    return transformers.GPT2Config(
        vocab_size=GPT2_VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
        bos_token_id=GPT2_EOS, eos_token_id=GPT2_EOS, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


def make_encoder(seed: int = 0, num_mem_tokens: int = 3, input_size: int = 16,
                 labels=("a", "b", "c"), **kwargs):
    torch.manual_seed(seed)
    base = build_encoder_base(tiny_bert_config(len(labels)))
    return encoder_from_base(
        base, num_mem_tokens=num_mem_tokens, input_size=input_size, labels=labels,
        special=BERT_SPECIAL, **kwargs,
    ).eval()


def tiny_llama_config() -> transformers.LlamaConfig:
    """A Llama-architecture base: RoPE positions, grouped-query attention (4 heads, 2 for
    keys and values), RMSNorm, gated MLP."""
    return transformers.LlamaConfig(
        vocab_size=GPT2_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=GPT2_EOS, eos_token_id=GPT2_EOS, pad_token_id=None,
    )


DECODER_CONFIGS = {"gpt2": tiny_gpt2_config, "llama": tiny_llama_config}


def make_decoder(seed: int = 0, num_mem_tokens: int = 2, segment_size: int = 5,
                 family: str = "gpt2", initializer_range: float | None = None):
    torch.manual_seed(seed)
    config = DECODER_CONFIGS[family]()
    if initializer_range is not None:
        config.initializer_range = initializer_range
    base = build_decoder_base(config)
    return decoder_from_base(
        base, num_mem_tokens=num_mem_tokens, segment_size=segment_size,
        special=SpecialTokens(eos=GPT2_EOS),
    ).eval()


#: The weights' spread of :func:`make_memory_decoder`: 15 times GPT-2's 0.02.
MEMORY_DECODER_INIT = 0.3


def make_memory_decoder(seed: int = 0):
    """A tiny GPT-2 decoder whose outputs depend strongly on its memory. GPT-2's own init
    (weights of spread 0.02) attends almost uniformly and barely reads the memory slots:
    scaling its memory by 10 leaves the greedy ids unchanged. Drawn 15 times wider, its
    attention is sharp, so the memory slots steer the logits and zeroing the memory, or
    reading the memory of one segment earlier, changes most generations, while its
    recurrence stays within float32 noise closed loop. Tests that rely on this check it
    themselves (``tests/runtime/test_generation.py``)."""
    return make_decoder(seed, initializer_range=MEMORY_DECODER_INIT)


def write_bert_folder(folder: Path) -> Path:
    """A Hugging Face BERT folder (config.json + vocab.txt) for the tiny encoder."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_bert_config().save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                             "do_lower_case": True}))
    return folder


def write_gpt2_folder(folder: Path, family: str = "gpt2") -> Path:
    """A Hugging Face folder of a tiny decoder base (config.json of ``family`` + a
    byte-level BPE tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    DECODER_CONFIGS[family]().save_pretrained(folder)
    vocab = {chr(ord("a") + i): i for i in range(26)}
    vocab.update({f"\u0120{chr(ord('a') + i)}": 26 + i for i in range(26)})
    vocab["\u0120"] = 52
    vocab["<|endoftext|>"] = GPT2_EOS
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2TokenizerFast", "eos_token": "<|endoftext|>",
        "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    }))
    return folder


@pytest.fixture(autouse=True)
def _torch_threads():
    """Each test leaves torch's threads as it found them (an export without --threads
    sets them from the host's load, which would make later tests' float sums vary)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def encoder():
    return make_encoder()


@pytest.fixture
def decoder():
    return make_decoder()


def bert_tokenizer_json(tmp_path_factory) -> str:
    """The tiny BERT folder's WordPiece tokenizer, serialized."""
    folder = write_bert_folder(tmp_path_factory.mktemp("bert-base"))
    return transformers.AutoTokenizer.from_pretrained(folder).backend_tokenizer.to_str()


@pytest.fixture(scope="session")
def encoder_checkpoint(tmp_path_factory) -> Path:
    """A tiny encoder saved in rmt-deploy's format, with a WordPiece tokenizer."""
    from rmt_deploy.model.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("encoder") / "encoder.pt"
    return save_checkpoint(make_encoder(), path, bert_tokenizer_json(tmp_path_factory))


@pytest.fixture(scope="session")
def decoder_checkpoint(tmp_path_factory) -> Path:
    """A tiny decoder saved in rmt-deploy's format, with a byte-level BPE tokenizer."""
    from rmt_deploy.model.checkpoint import save_checkpoint

    folder = write_gpt2_folder(tmp_path_factory.mktemp("gpt2-base"))
    tokenizer = (folder / "tokenizer.json").read_text()
    path = tmp_path_factory.mktemp("decoder") / "decoder.pt"
    return save_checkpoint(make_decoder(), path, tokenizer)


@pytest.fixture(scope="session")
def memory_decoder_checkpoint(tmp_path_factory) -> Path:
    """:func:`make_memory_decoder` saved in rmt-deploy's format, with the byte-level BPE
    tokenizer of ``decoder_checkpoint``."""
    from rmt_deploy.model.checkpoint import save_checkpoint

    folder = write_gpt2_folder(tmp_path_factory.mktemp("gpt2-base"))
    tokenizer = (folder / "tokenizer.json").read_text()
    path = tmp_path_factory.mktemp("memory-decoder") / "memory-decoder.pt"
    return save_checkpoint(make_memory_decoder(), path, tokenizer)


@pytest.fixture(scope="session")
def encoder_export(encoder_checkpoint, tmp_path_factory) -> Path:
    """The tiny encoder exported (read-only: copy it before changing it)."""
    from rmt_deploy.export.pipeline import export_checkpoint

    return export_checkpoint(encoder_checkpoint, tmp_path_factory.mktemp("exports") / "enc").folder


@pytest.fixture(scope="session")
def decoder_export(decoder_checkpoint, tmp_path_factory) -> Path:
    """The tiny decoder exported (read-only: copy it before changing it)."""
    from rmt_deploy.export.pipeline import export_checkpoint

    return export_checkpoint(decoder_checkpoint, tmp_path_factory.mktemp("exports") / "dec").folder


@pytest.fixture(scope="session")
def memory_decoder_export(memory_decoder_checkpoint, tmp_path_factory) -> Path:
    """The memory decoder exported (read-only: copy it before changing it)."""
    from rmt_deploy.export.pipeline import export_checkpoint

    return export_checkpoint(memory_decoder_checkpoint,
                             tmp_path_factory.mktemp("exports") / "memdec").folder


@pytest.fixture(scope="session")
def armt_export(tmp_path_factory) -> Path:
    """The tiny published ARMT (shared naming, LoRA, no correction) exported (read-only:
    copy it before changing it)."""
    from published_layouts import ALPHA, write_llama_base, write_published

    from rmt_deploy.export.pipeline import ExportOptions, export_checkpoint
    from rmt_deploy.model.checkpoint import AuthorsOptions

    folder = tmp_path_factory.mktemp("armt")
    published = write_published(folder / "ckpt", naming="shared", config={"segment_size": 6})
    authors = AuthorsOptions(base_model=write_llama_base(folder / "base"), lora_alpha=ALPHA,
                             armt_correction=False)
    options = ExportOptions(authors=authors, validation_segments=3, threads=1)
    return export_checkpoint(published.path, folder / "export", options).folder


@pytest.fixture(scope="session")
def armt_reference(armt_export) -> torch.nn.Module:
    """The PyTorch reference ARMT of :func:`armt_export`, loaded from the same file (its
    checkpoint and base lie beside the export)."""
    from published_layouts import ALPHA

    from rmt_deploy.model.checkpoint import AuthorsOptions, load_checkpoint

    root = armt_export.parent
    return load_checkpoint(root / "ckpt" / "model.safetensors", AuthorsOptions(
        base_model=root / "base", lora_alpha=ALPHA, armt_correction=False)).rmt.eval()


@pytest.fixture(scope="session")
def window_export(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """The published ARMT (segment 6) exported with --sliding-window (correction on, the
    authors' default), and the reference loaded from the same file (read-only)."""
    from published_layouts import (
        ALPHA,
        export_published,
        write_llama_base,
        write_published,
    )

    from rmt_deploy.model.checkpoint import AuthorsOptions, load_checkpoint

    root = tmp_path_factory.mktemp("armt-window")
    published = write_published(root / "ckpt", naming="shared", config={"segment_size": 6})
    base = write_llama_base(root / "base")
    out = root / "export"
    result = export_published(published.path, base, "--sliding-window", "-o", str(out))
    assert result.exit_code == 0, result.output
    reference = load_checkpoint(published.path, AuthorsOptions(
        base_model=base, lora_alpha=ALPHA, sliding_window=True)).rmt
    return out, reference


@pytest.fixture(scope="session")
def llama_rmt_export(tmp_path_factory) -> Path:
    """The tiny published plain RMT on Llama (``MemoryCell``, LoRA; segment 6, 3 memory
    tokens) exported (read-only: copy it before changing it). Its checkpoint and base
    lie beside the export: ``../ckpt/model.safetensors`` and ``../base``
    (:func:`llama_rmt_reference` loads them)."""
    from published_layouts import ALPHA, write_published

    from rmt_deploy.export.pipeline import ExportOptions, export_checkpoint
    from rmt_deploy.model.checkpoint import AuthorsOptions

    root = tmp_path_factory.mktemp("llama-rmt")
    published = write_published(root / "ckpt", armt=False, config={"segment_size": 6})
    authors = AuthorsOptions(base_model=write_gpt2_folder(root / "base", "llama"),
                             lora_alpha=ALPHA)
    options = ExportOptions(authors=authors, validation_segments=3, threads=1)
    return export_checkpoint(published.path, root / "export", options).folder


@pytest.fixture(scope="session")
def llama_rmt_reference(llama_rmt_export) -> torch.nn.Module:
    """The PyTorch reference of :func:`llama_rmt_export`, loaded from the same file."""
    from published_layouts import ALPHA

    from rmt_deploy.model.checkpoint import AuthorsOptions, load_checkpoint

    root = llama_rmt_export.parent
    return load_checkpoint(root / "ckpt" / "model.safetensors", AuthorsOptions(
        base_model=root / "base", lora_alpha=ALPHA)).rmt.eval()
