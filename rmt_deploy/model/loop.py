"""The full-sequence recurrence of the reference model: segment, run the step over
every segment with per-row scheduling, collect the results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rmt_deploy.errors import InputError
from rmt_deploy.model.decoder import DecoderRMT
from rmt_deploy.model.encoder import EncoderRMT
from rmt_deploy.segmentation import batch_schedule, clean_ids, segment_bounds, step_inputs

Documents = Sequence[Sequence[int] | np.ndarray | torch.Tensor]


@dataclass
class EncoderResult:
    logits: torch.Tensor  # [batch, n_labels], from each row's last segment
    memory: torch.Tensor  # [batch, M, H], the memory after each row's last segment
    segments: list[int]  # segments run per row


@dataclass
class DecoderResult:
    logits: list[torch.Tensor]  # per row: [n_tokens, vocab], every segment's token logits
    memory: torch.Tensor  # [batch, M, H], the memory after each row's last segment
    segments: list[int]


def _segment_documents(rmt, docs: Documents) -> tuple[list[np.ndarray], list[list[tuple]]]:
    config = rmt.rmt_config
    cleaned = []
    for index, doc in enumerate(docs):
        ids = doc.detach().cpu().numpy() if isinstance(doc, torch.Tensor) else doc
        ids = clean_ids(ids, config)
        if ids.size == 0:
            raise InputError(f"document {index} has no tokens after removing special tokens")
        cleaned.append(ids)
    return cleaned, [segment_bounds(len(ids), config) for ids in cleaned]


def _recur(rmt, docs: Documents, memory: torch.Tensor | None, on_step) -> torch.Tensor:
    """Run every step, calling ``on_step(rows, attention_mask, outputs)``; return the
    final memory."""
    cleaned, bounds = _segment_documents(rmt, docs)
    device = next(rmt.parameters()).device
    if memory is None:
        memory = rmt.initial_memory(len(cleaned))
    for active in batch_schedule([len(b) for b in bounds], rmt.rmt_config):
        rows = [row for row, _ in active]
        segments = [cleaned[row][slice(*bounds[row][index])] for row, index in active]
        ids, mask = step_inputs(segments, rmt.rmt_config)
        rows_t = torch.tensor(rows, device=device)
        outputs, new_memory = rmt(
            torch.from_numpy(ids).to(device),
            torch.from_numpy(mask).to(device),
            memory.index_select(0, rows_t),
        )
        memory = memory.index_copy(0, rows_t, new_memory.to(memory.dtype))
        on_step(rows, mask, outputs)
    return memory


def run_encoder(
    rmt: EncoderRMT, docs: Documents, memory: torch.Tensor | None = None
) -> EncoderResult:
    """Classify each document from its last segment, the authors' per-row semantics."""
    logits: list[torch.Tensor | None] = [None] * len(docs)
    counts = [0] * len(docs)

    def keep_last(rows, _mask, outputs):
        for position, row in enumerate(rows):
            logits[row] = outputs[position]
            counts[row] += 1

    final_memory = _recur(rmt, docs, memory, keep_last)
    return EncoderResult(torch.stack(logits), final_memory, counts)


def run_decoder(
    rmt: DecoderRMT, docs: Documents, memory: torch.Tensor | None = None
) -> DecoderResult:
    """Token logits of every segment of each document, concatenated per row."""
    pieces: list[list[torch.Tensor]] = [[] for _ in docs]

    def keep_tokens(rows, mask, outputs):
        for position, row in enumerate(rows):
            pieces[row].append(outputs[position, : int(mask[position].sum())])

    final_memory = _recur(rmt, docs, memory, keep_tokens)
    return DecoderResult(
        [torch.cat(p) for p in pieces], final_memory, [len(p) for p in pieces]
    )


def decoder_loss(
    rmt: DecoderRMT, input_ids: torch.Tensor, labels: torch.Tensor,
    labels_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The authors' loss: all segments' logits concatenated, next-token shift over the
    whole sequence, mean cross-entropy (over ``labels_mask`` positions if given)."""
    logits = torch.stack(run_decoder(rmt, list(input_ids)).logits)
    flat_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    flat_labels = labels[:, 1:].reshape(-1)
    if labels_mask is not None:
        keep = labels_mask[:, :-1].reshape(-1).bool()
        flat_logits, flat_labels = flat_logits[keep], flat_labels[keep]
    return F.cross_entropy(flat_logits, flat_labels)


@torch.no_grad()
def generate(rmt: DecoderRMT, ids: Sequence[int] | np.ndarray, max_new_tokens: int) -> list[int]:
    """Greedy generation after a document: every segment but the last writes memory; the
    last is read as ``[memory ; tokens]`` with no write slots and extended token by token.
    """
    config = rmt.rmt_config
    cleaned = clean_ids(ids, config)
    if cleaned.size == 0:
        raise InputError("cannot generate after an empty document")
    bounds = segment_bounds(len(cleaned), config)
    head = cleaned[: bounds[-1][0]]
    memory = run_decoder(rmt, [head]).memory if head.size else rmt.initial_memory(1)
    tokens = torch.from_numpy(cleaned[bounds[-1][0] :]).unsqueeze(0)
    limit = getattr(rmt.model.config, "n_positions", None)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        if limit is not None and config.num_mem_tokens + tokens.shape[1] > limit:
            raise InputError(
                f"cannot generate {max_new_tokens} tokens: the last segment would exceed the "
                f"model's {limit} positions; ask for fewer tokens"
            )
        logits = rmt.read(tokens, torch.ones_like(tokens), memory)
        next_id = int(logits[0, -1].argmax())
        generated.append(next_id)
        if next_id == config.eos_token_id:
            break
        tokens = torch.cat([tokens, torch.tensor([[next_id]])], dim=1)
    return generated
