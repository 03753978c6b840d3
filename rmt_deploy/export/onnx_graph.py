"""The step as one ONNX graph, traced from the reference modules with torch.onnx."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from rmt_deploy.manifest import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    MEMORY_IN,
    MEMORY_OUT,
    READ_GRAPH,
    STEP_GRAPH,
)
from rmt_deploy.model.decoder import DecoderReadStep
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
    """Write the step graph (or, for decoders, the read graph) to ``path``."""
    config = rmt.rmt_config
    module = DecoderReadStep(rmt) if graph == READ_GRAPH else rmt
    outputs = [LOGITS] if graph == READ_GRAPH else [LOGITS, MEMORY_OUT]
    token_axes = {0: "batch"} if config.is_encoder else {0: "batch", 1: "tokens"}
    dynamic_axes = {INPUT_IDS: token_axes, ATTENTION_MASK: token_axes, MEMORY_IN: {0: "batch"},
                    LOGITS: token_axes if not config.is_encoder else {0: "batch"}}
    if graph == STEP_GRAPH:
        dynamic_axes[MEMORY_OUT] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes on Python-side shape arithmetic
        torch.onnx.export(
            module.eval(), trace_inputs(rmt), str(path), dynamo=False, opset_version=opset,
            input_names=[INPUT_IDS, ATTENTION_MASK, MEMORY_IN], output_names=outputs,
            dynamic_axes=dynamic_axes, do_constant_folding=True,
        )
