"""The LM head as ONNX's ``Gemm(hidden, weight, transB=1)``: the output embedding is read
as stored (one copy of a head tied to the input embedding, nothing transposed on disk or
at load), and ONNX Runtime packs it once for its fast matrix product (a decode token's
head ran ~3x faster than as ``MatMul(weight, hidden^T)``)."""

from __future__ import annotations

from typing import Any

import torch


class _HeadProduct(torch.autograd.Function):
    """``hidden @ weight^T``, exported as one Gemm node with ``transB=1``."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.matmul(hidden, weight.t())

    @staticmethod
    def symbolic(g: Any, hidden: Any, weight: Any) -> Any:
        return g.op("Gemm", hidden, weight, transB_i=1)


def head_logits(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``head`` (a linear output embedding [vocab, H], bias or not) on ``hidden``
    [..., H]: logits [..., vocab]."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    logits = _HeadProduct.apply(flat, head.weight)
    if head.bias is not None:
        logits = logits + head.bias
    return logits.reshape(*hidden.shape[:-1], head.weight.shape[0])
