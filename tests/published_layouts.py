"""The authors' published Llama checkpoints, written from a tiny random Llama as their
wrappers save them (``shared/reference/armt.md``, "Checkpoint layout"): the ARMT wrapper
and the plain RMT ``MemoryCell``, peft-wrapped with LoRA (peft is not installed: its key
names are written here), the ARMT layers under either naming.

Each writer returns the file and the expected result computed independently: the plain
Hugging Face state dict with every LoRA merged as ``W + (alpha / r) B A`` in float64."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from click.testing import CliRunner, Result
from conftest import tiny_llama_config, write_gpt2_folder
from safetensors.torch import save_file, save_model
from torch import nn

from rmt_deploy.cli import export_main
from rmt_deploy.model.base import build_decoder_base

RANK, ALPHA, D_MEM, MEM_TOKENS, SEGMENT = 4, 32.0, 8, 3, 6
#: peft's default target modules for Llama.
LORA_TARGETS = ("self_attn.q_proj", "self_attn.v_proj")
PEFT = "memory_cell.model.base_model.model."
PLAIN = "memory_cell.model."


@dataclass(frozen=True)
class Published:
    path: Path
    expected: dict[str, torch.Tensor]  # HF names, LoRA merged
    memory: torch.Tensor
    maps: list[dict[str, torch.Tensor]]  # per layer; [] for the plain RMT


def _lora(weight: torch.Tensor, generator: torch.Generator):
    out, inp = weight.shape
    lora_a = torch.randn(RANK, inp, generator=generator) * 0.2
    lora_b = torch.randn(out, RANK, generator=generator) * 0.2  # trained: not zero
    merged = (weight.double() + (ALPHA / RANK) * (lora_b.double() @ lora_a.double())).float()
    return lora_a, lora_b, merged


def _maps(d_model: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every map at nn.Linear's init scale (1/sqrt(d_model)), W_mv non-zero: a state that
    matters and stays finite over many segments, as a trained model's does."""
    scale = d_model ** -0.5
    return {"W_mq.weight": torch.randn(D_MEM, d_model, generator=generator) * scale,
            "W_mk.weight": torch.randn(D_MEM, d_model, generator=generator) * scale,
            "W_mv.weight": torch.randn(d_model, d_model, generator=generator) * scale,
            "W_mb.weight": torch.randn(1, d_model, generator=generator) * scale,
            "W_mb.bias": torch.randn(1, generator=generator)}


def llama_config(tied: bool = False):
    """The tiny Llama; ``tied``: its LM head is its input embedding (as Llama-3.2-1B's)."""
    config = tiny_llama_config()
    config.tie_word_embeddings = tied
    return config


def write_llama_base(folder: Path, tied: bool = False) -> Path:
    """The --base-model folder of the tiny Llama (config.json + tokenizer)."""
    write_gpt2_folder(folder, "llama")
    llama_config(tied).save_pretrained(folder)
    return folder


def published_state(armt: bool = True, lora: bool = True, naming: str = "base",
                    seed: int = 0, tied: bool = False):
    """The wrapper's state dict, as its ``state_dict()`` returns it: a tensor the wrapper
    holds twice is one tensor under two names. ``naming``: ARMT layers under the base
    model's path ("base"), under ``memory_cell.layers.N`` ("shared") or both ("both",
    the wrapper's own state dict)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    base = build_decoder_base(llama_config(tied))
    plain = {k: v.detach() for k, v in base.state_dict().items()}
    d_model = base.config.hidden_size
    memory = torch.randn(MEM_TOKENS, d_model, generator=generator)
    prefix = PEFT if lora else PLAIN
    state, expected = {"memory_cell.memory": memory}, {}
    maps = [_maps(d_model, generator) for _ in range(base.config.num_hidden_layers)] \
        if armt else []
    for key, value in plain.items():
        expected[key] = value
        module, _, leaf = key.rpartition(".")
        name = key
        if lora and leaf == "weight" and module.endswith(LORA_TARGETS):
            lora_a, lora_b, expected[key] = _lora(value, generator)
            name = f"{module}.base_layer.weight"
            extra = {f"{module}.lora_A.default.weight": lora_a,
                     f"{module}.lora_B.default.weight": lora_b}
        else:
            extra = {}
        for stored, tensor in {name: value, **extra}.items():
            for full in _names(stored, armt, naming, prefix):
                state[full] = tensor
    for index, layer in enumerate(maps):
        for name, tensor in layer.items():
            for full in _names(f"model.layers.{index}.{name}", armt, naming, prefix,
                               is_map=True):
                state[full] = tensor
    return state, expected, memory, maps


def _names(key: str, armt: bool, naming: str, prefix: str, is_map: bool = False):
    parts = key.split(".")
    if not (armt and key.startswith("model.layers.")):
        return [prefix + key]
    index, rest = parts[2], ".".join(parts[3:])
    inner = rest if is_map else f"layer.{rest}"
    names = {"base": [f"{prefix}model.layers.{index}.{inner}"],
             "shared": [f"memory_cell.layers.{index}.{inner}"]}
    names["both"] = names["base"] + names["shared"]
    return names[naming]


def write_published(folder: Path, armt: bool = True, lora: bool = True, naming: str = "base",
                    config: dict | None = None, seed: int = 0,
                    change: Callable[[dict], None] | None = None, tied: bool = False,
                    hub_save: bool = False) -> Published:
    """``model.safetensors`` (+ the wrapper's ``config.json``) in ``folder``; ``change``
    edits the state dict before it is saved. ``hub_save``: saved as the wrapper's
    ``PyTorchModelHubMixin`` saves it (``safetensors.torch.save_model``: of the names of
    a shared tensor the first in sorted order is kept, the others recorded in the
    metadata); otherwise every name is stored."""
    state, expected, memory, maps = published_state(armt, lora, naming, seed, tied)
    if change is not None:
        change(state)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    if hub_save:
        save_model(_Wrapper(state), str(path), metadata={"format": "pt"})
    else:
        save_file({k: v.clone().contiguous() for k, v in state.items()}, str(path),
                  metadata={"format": "pt"})
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return Published(path, expected, memory, maps)


class _Wrapper(nn.Module):
    """Stands in for the authors' wrapper at ``save_model``: its state dict is ``state``."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs):
        return dict(self._state)


def export_published(checkpoint: Path, base: Path, *options: str) -> Result:
    """``rmt-export`` of a published checkpoint over ``base`` (LoRA alpha :data:`ALPHA`,
    3 validation segments, 1 thread, quiet), ``options`` added."""
    return CliRunner().invoke(export_main, [
        str(checkpoint), "--base-model", str(base), "--lora-alpha", str(ALPHA),
        "--validation-segments", "3", "--threads", "1", "-q", *options])
