"""Tiny random Llama ARMTs shared by the ARMT tests (no downloads)."""

from __future__ import annotations

import torch
from conftest import GPT2_EOS, tiny_llama_config

from rmt_deploy.model.base import build_decoder_base
from rmt_deploy.model.factory import SpecialTokens, armt_from_base

ARMT_MEM = 3
ARMT_D_MEM = 4
ARMT_SEGMENT = 6


def make_armt(seed: int = 0, correction: bool = True, sliding_window: bool = False):
    """A 2-layer Llama ARMT (hidden 32, GQA 4/2) with random maps that make memory matter;
    with ``sliding_window`` a segment also attends to the previous one."""
    torch.manual_seed(seed)
    base = build_decoder_base(tiny_llama_config())
    return armt_from_base(base, num_mem_tokens=ARMT_MEM, d_mem=ARMT_D_MEM,
                          segment_size=ARMT_SEGMENT, correction=correction,
                          special=SpecialTokens(eos=GPT2_EOS),
                          sliding_window=sliding_window).eval()


def map_weights(rmt) -> list[dict[str, torch.Tensor]]:
    """Each layer's maps, as :func:`armt_from_base` takes them."""
    return [dict(maps.state_dict()) for maps in rmt.maps]
