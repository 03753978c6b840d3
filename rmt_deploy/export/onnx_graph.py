"""The step as one ONNX graph, traced from the reference modules with torch.onnx."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from rmt_deploy.contract import READ, STEP, WRITE, variant
from rmt_deploy.model.base import StepVariant
from rmt_deploy.model.encoder import EncoderRMT, skipping_step
from rmt_deploy.segmentation import content_id_range, step_inputs

DEFAULT_OPSET = 17  # LayerNormalization is one node from 17 on
EXPORTER = "torch.onnx TorchScript exporter (dynamo=False)"


def trace_inputs(rmt: torch.nn.Module, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Batch-2 example inputs (one full and one short segment) so the batch axis stays
    dynamic; the memory is perturbed so no slot is constant."""
    config = rmt.rmt_config
    rng = np.random.default_rng(seed)
    low, high = content_id_range(config)
    segments = [rng.integers(low, high, config.segment_size),
                rng.integers(low, high, max(1, config.segment_size // 2))]
    ids, mask = step_inputs(segments, config)
    with torch.no_grad():
        memory = rmt.initial_memory(2).detach().clone()
        memory += 0.01 * torch.randn(memory.shape, generator=torch.Generator().manual_seed(seed))
    return torch.from_numpy(ids), torch.from_numpy(mask), memory


def export_graph(rmt: torch.nn.Module, path: Path, graph: str,
                 opset: int = DEFAULT_OPSET) -> None:
    """Write variant ``graph`` of the step contract to ``path``, its tensor names and
    dynamic axes as the contract declares them."""
    contract = variant(rmt.rmt_config, graph)
    module = step_module(rmt, graph)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes on Python-side shape arithmetic
        torch.onnx.export(
            module.eval(), trace_inputs(rmt), str(path), dynamo=False, opset_version=opset,
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
    return StepVariant(rmt, {STEP: "forward", WRITE: "write", READ: "read"}[graph])
