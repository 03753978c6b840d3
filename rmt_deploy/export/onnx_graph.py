"""The step as one ONNX graph, traced from the reference modules with torch.onnx."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from rmt_deploy.contract import (
    BATCH,
    DECODE,
    PAST,
    PREFILL,
    STEP,
    TOKENS,
    TOTAL,
    WRITE,
    concrete,
    context_slots,
    variant,
)
from rmt_deploy.model.base import StepVariant
from rmt_deploy.model.encoder import EncoderRMT, skipping_step
from rmt_deploy.segmentation import content_id_range, step_inputs

DEFAULT_OPSET = 17  # LayerNormalization is one node from 17 on
EXPORTER = "torch.onnx TorchScript exporter (dynamo=False)"


def trace_inputs(rmt: torch.nn.Module, graph: str = STEP,
                 seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Batch-2 example inputs (one full and one short segment) so the batch axis stays
    dynamic; the state inputs are derived from the contract's declaration, random so no
    slot is constant. A decode step gets a cache of a padded prefill (its mask holds
    zeros) and one new token a row."""
    config = rmt.rmt_config
    contract = variant(config, graph)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    low, high = content_id_range(config)
    segments = [rng.integers(low, high, config.segment_size),
                rng.integers(low, high, max(1, config.segment_size // 2))]
    ids, mask = step_inputs(segments, config)
    if graph == DECODE:
        mask = np.concatenate([np.ones((2, context_slots(config)), np.int64), mask,
                               np.ones((2, 2), np.int64)], axis=1)
        ids = rng.integers(low, high, (2, 1))
    sizes = {BATCH: 2, TOKENS: ids.shape[1], PAST: mask.shape[1] - 1, TOTAL: mask.shape[1]}
    state = []
    for pair in contract.reads:
        shape = concrete(pair.shape, sizes)
        dtype = getattr(torch, pair.dtype)
        state.append(torch.randn(shape, generator=generator).to(dtype) if dtype.is_floating_point
                     else torch.zeros(shape, dtype=dtype))
    return torch.from_numpy(ids), torch.from_numpy(mask), *state


def export_graph(rmt: torch.nn.Module, path: Path, graph: str,
                 opset: int = DEFAULT_OPSET) -> None:
    """Write variant ``graph`` of the step contract to ``path``, its tensor names and
    dynamic axes as the contract declares them."""
    contract = variant(rmt.rmt_config, graph)
    module = step_module(rmt, graph)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes on Python-side shape arithmetic
        torch.onnx.export(
            module.eval(), trace_inputs(rmt, graph), str(path), dynamo=False,
            opset_version=opset,
            input_names=[t.name for t in contract.inputs],
            output_names=[t.name for t in contract.outputs],
            dynamic_axes=contract.dynamic_axes(), do_constant_folding=True,
        )


def step_module(rmt: torch.nn.Module, graph: str) -> torch.nn.Module:
    """The module exported as variant ``graph``: for an encoder whose base model is
    recognised, the step and write variants compute only the rows that are read
    (:func:`~rmt_deploy.model.encoder.skipping_step`); otherwise the reference method."""
    if isinstance(rmt, EncoderRMT) and graph in (STEP, WRITE):
        skipping = skipping_step(rmt, write=graph == WRITE)
        if skipping is not None:
            return skipping
    return StepVariant(rmt, {STEP: "forward", WRITE: "write", PREFILL: "prefill",
                             DECODE: "decode"}[graph])
