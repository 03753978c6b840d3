"""Hostile published Llama checkpoints (ARMT wrapper, plain RMT ``MemoryCell``, peft
LoRA): each refusal of ``armt_checkpoint`` reaches ``rmt-export`` as one line, exit 1,
nothing written (harness: tests/hostile/harness.py). These cases write their own files,
so they use none of the shared assets."""

from __future__ import annotations

import pytest
import torch
from conftest import write_gpt2_folder
from harness import Case, run_case
from published_layouts import PEFT, write_published

#: Nothing is exported beside the checkpoint.
NO_EXPORT = ("ckpt/model-export",)


def _export(*options, armt=True, lora=True, naming="base", change=None):
    """``rmt-export ckpt/model.safetensors --base-model base OPTIONS`` on a published
    checkpoint written by ``write_published``."""
    def prepare(scene):
        published = write_published(scene.work / "ckpt", armt=armt, lora=lora, naming=naming,
                                     change=change)
        base = write_gpt2_folder(scene.work / "base", "llama")
        return [published.path, "--base-model", base, *options]
    return prepare


def _drop(key):
    return lambda state: state.pop(key)


def _plain_layer_into_armt(state):
    state[PEFT + "model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 32)


def _disagreeing_copy(state):
    key = "memory_cell.layers.0.layer.mlp.up_proj.weight"
    state[key] = state[key] + 1


def _wide_map(state):
    state[PEFT + "model.layers.0.W_mv.weight"] = torch.zeros(32, 33)


def _bad_config_export(scene):
    args = _export("--lora-alpha", "32")(scene)
    (scene.work / "ckpt" / "config.json").write_text('{"segment_size": ')
    return args


CASES = [
    Case("published-lora-without-lora-alpha", "rmt-export", _export(),
         says=("LoRA", "--lora-alpha 32"), absent=NO_EXPORT),
    Case("published-lora-alpha-without-lora", "rmt-export",
         _export("--lora-alpha", "32", armt=False, lora=False),
         says=("--lora-alpha", "no LoRA"), absent=NO_EXPORT),
    Case("published-lora-alpha-not-positive", "rmt-export", _export("--lora-alpha", "0"),
         code=2, says=("--lora-alpha",), absent=NO_EXPORT),
    Case("published-mixed-layouts", "rmt-export",
         _export("--lora-alpha", "32", change=_plain_layer_into_armt),
         says=("mixes layouts", "layer 1"), absent=NO_EXPORT),
    Case("published-missing-memory-maps", "rmt-export",
         _export("--lora-alpha", "32", change=_drop(PEFT + "model.layers.1.W_mb.bias")),
         says=("layer 1", "memory maps", "W_mb.bias"), absent=NO_EXPORT),
    Case("published-namings-disagree", "rmt-export",
         _export("--lora-alpha", "32", naming="both", change=_disagreeing_copy),
         says=("different values",), absent=NO_EXPORT),
    Case("published-map-shapes-disagree", "rmt-export",
         _export("--lora-alpha", "32", change=_wide_map),
         says=("shapes disagree", "W_mv.weight"), absent=NO_EXPORT),
    Case("published-lora-incomplete", "rmt-export",
         _export("--lora-alpha", "32", armt=False,
                 change=_drop(PEFT + "model.layers.0.self_attn.v_proj.base_layer.weight")),
         says=("LoRA of", "incomplete", "base_layer"), absent=NO_EXPORT),
    Case("published-armt-option-on-a-plain-rmt", "rmt-export",
         _export("--sliding-window", armt=False, lora=False),
         says=("--sliding-window", "ARMT checkpoints only"), absent=NO_EXPORT),
    Case("published-window-past-the-positions", "rmt-export",
         _export("--lora-alpha", "32", "--sliding-window", "--segment-size", "40"),
         says=("83 positions", "has 64", "--segment-size"), absent=NO_EXPORT),
    Case("published-wrapper-config-not-json", "rmt-export", _bad_config_export,
         says=("config.json", "not readable JSON"), absent=NO_EXPORT),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_published_checkpoint(case, tmp_path):
    run_case(case, tmp_path, assets=None)
