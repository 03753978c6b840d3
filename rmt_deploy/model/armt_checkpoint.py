"""The authors' published Llama checkpoints, read into plain Hugging Face names.

Two layouts (``shared/reference/armt.md``, "Checkpoint layout"), both under
``memory_cell.*``, the base model either peft-wrapped (``memory_cell.model.base_model.
model.*``, LoRA as ``base_layer`` / ``lora_A.default`` / ``lora_B.default``) or plain
(``memory_cell.model.*``):

- the ARMT wrapper: per layer N the memory maps ``model.layers.N.W_m{q,k,v,b}.*`` and the
  wrapped layer under ``model.layers.N.layer.*``; a save that drops shared tensors may keep
  the layer as ``memory_cell.layers.N.*`` instead (both namings are accepted);
- the plain RMT ``MemoryCell`` on a Llama base, with or without LoRA.

LoRA is merged into the base weights here: ``W + (alpha / r) B A``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rmt_deploy.errors import CheckpointError

#: The keys of one layer's memory maps, as ``armt_from_base`` takes them.
MAP_KEYS = ("W_mq.weight", "W_mk.weight", "W_mv.weight", "W_mb.weight", "W_mb.bias")
MEMORY = "memory_cell.memory"
_PEFT = "memory_cell.model.base_model.model."
_PLAIN = "memory_cell.model."
_SHARED = "memory_cell.layers."
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LORA_A, _LORA_B, _BASE = ".lora_A.default.weight", ".lora_B.default.weight", ".base_layer."


@dataclass(frozen=True)
class LoraMerge:
    """The LoRA adapters merged into the base weights."""

    rank: int
    alpha: float
    modules: int  # projections merged

    def to_dict(self) -> dict[str, Any]:
        return {"merged": True, "rank": self.rank, "alpha": self.alpha,
                "modules": self.modules}


@dataclass(frozen=True)
class PublishedCheckpoint:
    """A published checkpoint's weights, ready for a plain Hugging Face causal LM."""

    base_state: Mapping[str, torch.Tensor]  # HF names: model.layers.N.*, lm_head.weight
    memory: torch.Tensor  # [num_mem_tokens, d_model], the learned memory embeddings
    maps: tuple[Mapping[str, torch.Tensor], ...]  # per layer, keyed by MAP_KEYS; () if RMT
    lora: LoraMerge | None  # None: the file held no LoRA
    wrapper_config: Mapping[str, Any] = field(default_factory=dict)  # config.json beside

    @property
    def is_armt(self) -> bool:
        return bool(self.maps)

    @property
    def num_mem_tokens(self) -> int:
        return self.memory.shape[0]

    @property
    def d_mem(self) -> int | None:
        return self.maps[0]["W_mq.weight"].shape[0] if self.maps else None

    @property
    def num_layers(self) -> int:
        return len({int(m.group(1)) for k in self.base_state if (m := _LAYER.fullmatch(k))})

    @property
    def segment_size(self) -> int | None:
        return recorded_segment_size(self.wrapper_config)


def is_published(keys: list[str]) -> bool:
    """Whether ``keys`` need this reader: ARMT maps, a peft-wrapped base or LoRA, or
    layers stored as ``memory_cell.layers.*`` (a plain ``MemoryCell`` needs none of it)."""
    return any(key.startswith((_PEFT, _SHARED)) or ".W_m" in key or ".lora_" in key
               for key in keys)


def read_published(path: Path, weights: Mapping[str, torch.Tensor],
                   lora_alpha: float | None) -> PublishedCheckpoint:
    """Read ``weights`` (the whole file's state dict) and the ``config.json`` beside
    ``path``; refuses mixed layouts, missing memory maps, disagreeing shapes and LoRA
    without ``lora_alpha``."""
    memory = weights.get(MEMORY)
    if memory is None:
        raise CheckpointError(f"{path}: missing key {MEMORY} (the learned memory)")
    if memory.dim() != 2:
        raise CheckpointError(f"{path}: {MEMORY} has shape {tuple(memory.shape)}, expected "
                              "[num_mem_tokens, hidden]")
    flat = _base_names(path, {k: v for k, v in weights.items() if k != MEMORY})
    layers, maps = _split_maps(path, flat)
    merged, lora = _merge_lora(path, layers, lora_alpha)
    _check_shapes(path, merged, maps, memory.shape[1])
    return PublishedCheckpoint(merged, memory, maps, lora, read_wrapper_config(path))


def _base_names(path: Path, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every key under the base model's own names (``model.*``, ``lm_head.*``), the
    ``memory_cell.layers.N.*`` copies folded in."""
    peft = [k for k in weights if k.startswith(_PEFT)]
    plain = [k for k in weights if k.startswith(_PLAIN) and not k.startswith(_PEFT)]
    if peft and plain:
        raise CheckpointError(
            f"{path}: mixes layouts: both a peft-wrapped base ({peft[0]}) and a plain one "
            f"({plain[0]}); one checkpoint holds one model, re-save it from its wrapper")
    prefix = _PEFT if peft else _PLAIN
    strays = [k for k in weights if not k.startswith((prefix, _SHARED))]
    if strays:
        raise CheckpointError(f"{path}: unexpected keys beside the {prefix}* base: "
                              f"{_few(strays)}")
    flat = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    for key, value in weights.items():
        if not key.startswith(_SHARED):
            continue
        name = "model.layers." + key[len(_SHARED):]
        if name in flat and not _same(flat[name], value):
            raise CheckpointError(
                f"{path}: {key} and {prefix}{name} hold the same layer's tensor with "
                "different values; the file mixes two models")
        flat[name] = value
    return flat


def _split_maps(path: Path, flat: Mapping[str, torch.Tensor]):
    """The base weights with ARMT's ``.layer.`` unwrapped, and the per-layer maps."""
    maps: dict[int, dict[str, torch.Tensor]] = {}
    wrapped: set[int] = set()
    bare: set[int] = set()
    layers: dict[str, torch.Tensor] = {}
    for key, value in flat.items():
        match = _LAYER.fullmatch(key)
        if match is None:
            layers[key] = value
            continue
        index, rest = int(match.group(1)), match.group(2)
        if rest.startswith("W_m"):
            if rest not in MAP_KEYS:
                raise CheckpointError(f"{path}: unknown memory map {key}; expected "
                                      f"{', '.join(MAP_KEYS)}")
            maps.setdefault(index, {})[rest] = value
        elif rest.startswith("layer."):
            wrapped.add(index)
            layers[f"model.layers.{index}.{rest[len('layer.'):]}"] = value
        else:
            bare.add(index)
            layers[key] = value
    if (wrapped or maps) and bare:
        raise CheckpointError(
            f"{path}: mixes layouts: layer {min(bare)} is a plain layer but the file holds "
            "ARMT layers (memory maps, '.layer.' wrappers); one checkpoint holds one model")
    for index in sorted(wrapped | set(maps)):
        missing = [name for name in MAP_KEYS if name not in maps.get(index, {})]
        if missing:
            raise CheckpointError(
                f"{path}: ARMT layer {index} is missing its memory maps "
                f"({', '.join(missing)}); the checkpoint is incomplete")
        if index not in wrapped:
            raise CheckpointError(f"{path}: layer {index} has memory maps but no weights "
                                  "(model.layers.N.layer.* or memory_cell.layers.N.layer.*)")
    count = len(maps)
    if maps and sorted(maps) != list(range(count)):
        raise CheckpointError(f"{path}: ARMT layers {sorted(maps)} are not numbered 0.."
                              f"{count - 1}; the checkpoint is incomplete")
    return layers, tuple(maps[i] for i in range(count))


def _merge_lora(path: Path, weights: Mapping[str, torch.Tensor], alpha: float | None):
    """``W + (alpha / r) B A`` for every peft-wrapped projection; plain names out."""
    modules = sorted(k[: -len(_LORA_A)] for k in weights if k.endswith(_LORA_A))
    if not modules:
        if any(_BASE in k or ".lora_" in k for k in weights):
            raise CheckpointError(f"{path}: peft keys without lora_A.default weights "
                                  f"({_few([k for k in weights if _BASE in k or '.lora_' in k])})"
                                  "; only LoRA adapters are merged")
        if alpha is not None:
            raise CheckpointError(f"{path}: --lora-alpha was given but the checkpoint holds "
                                  "no LoRA weights (lora_A.default); leave it out")
        return dict(weights), None
    if alpha is None:
        raise CheckpointError(
            f"{path}: holds LoRA weights ({len(modules)} adapted projections) but no "
            "--lora-alpha; pass the lora_alpha the model was trained with (e.g. "
            "--lora-alpha 32)")
    merged = dict(weights)
    ranks = set()
    for module in modules:
        lora_a, lora_b = merged.pop(module + _LORA_A), merged.pop(module + _LORA_B, None)
        base = merged.pop(module + _BASE + "weight", None)
        if lora_b is None or base is None:
            lost = module + (_LORA_B if lora_b is None else _BASE + "weight")
            raise CheckpointError(f"{path}: LoRA of {module} is incomplete: no {lost}")
        if (lora_a.dim() != 2 or lora_b.dim() != 2 or base.dim() != 2
                or lora_b.shape[1] != lora_a.shape[0]
                or (lora_b.shape[0], lora_a.shape[1]) != tuple(base.shape)):
            raise CheckpointError(
                f"{path}: shapes of {module} disagree: base_layer {tuple(base.shape)}, "
                f"lora_A {tuple(lora_a.shape)}, lora_B {tuple(lora_b.shape)} (expected "
                "[out, in], [r, in], [out, r])")
        rank = lora_a.shape[0]
        ranks.add(rank)
        delta = (lora_b.float() @ lora_a.float()) * (alpha / rank)
        merged[module + ".weight"] = (base.float() + delta).to(base.dtype)
        bias = merged.pop(module + _BASE + "bias", None)
        if bias is not None:
            merged[module + ".bias"] = bias
    if len(ranks) > 1:
        raise CheckpointError(f"{path}: LoRA ranks differ between projections "
                              f"({sorted(ranks)}); only one rank per model is supported")
    leftover = [k for k in merged if _BASE in k or ".lora_" in k]
    if leftover:
        raise CheckpointError(f"{path}: peft keys left after merging LoRA: {_few(leftover)}"
                              "; only lora_A/lora_B.default adapters are merged")
    return merged, LoraMerge(ranks.pop(), float(alpha), len(modules))


def _check_shapes(path: Path, base: Mapping[str, torch.Tensor],
                  maps: tuple[Mapping[str, torch.Tensor], ...], d_model: int) -> None:
    embed = base.get("model.embed_tokens.weight", base.get("lm_head.weight"))
    if embed is None:
        raise CheckpointError(f"{path}: neither model.embed_tokens.weight nor "
                              "lm_head.weight; not a Llama-family base model")
    if embed.dim() != 2 or embed.shape[1] != d_model:
        raise CheckpointError(f"{path}: shapes disagree: {MEMORY} is [*, {d_model}] but "
                              f"the embeddings are {tuple(embed.shape)}")
    d_mem = maps[0]["W_mq.weight"].shape[0] if maps else 0
    expected = {"W_mq.weight": (d_mem, d_model), "W_mk.weight": (d_mem, d_model),
                "W_mv.weight": (d_model, d_model), "W_mb.weight": (1, d_model),
                "W_mb.bias": (1,)}
    for index, layer in enumerate(maps):
        for name, shape in expected.items():
            if tuple(layer[name].shape) != shape:
                raise CheckpointError(
                    f"{path}: shapes disagree: layer {index}'s {name} is "
                    f"{tuple(layer[name].shape)}, expected {shape} (d_mem {d_mem} from "
                    f"layer 0's W_mq, d_model {d_model} from {MEMORY})")


def recorded_segment_size(wrapper_config: Mapping[str, Any]) -> int | None:
    """The wrapper config's segment size, if it records one."""
    value = wrapper_config.get("segment_size")
    return value if isinstance(value, int) and value > 0 else None


def read_wrapper_config(path: Path) -> dict[str, Any]:
    """The wrapper's ``config.json`` beside the checkpoint; {} if there is none."""
    config = path.with_name("config.json")
    if not config.is_file():
        return {}
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config}: not readable JSON ({error}); fix or remove the "
                              "wrapper's config.json beside the checkpoint") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config}: holds a {type(data).__name__}, expected the "
                              "wrapper's keyword arguments as a JSON object")
    return data


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _few(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
