"""Proof that an export generates as the reference does: after the same documents, from
the same state, both sides generate greedily with their KV-cache graphs (prefill, then
one decode step a token); the tokens must be the same and the logits of every step close."""

from __future__ import annotations

import numpy as np

from rmt_deploy.contract import context_slots
from rmt_deploy.errors import ValidationError
from rmt_deploy.export.comparator import LoopErrors, validation_batches
from rmt_deploy.runtime.backends.base import State, StepEngine
from rmt_deploy.runtime.generation import GenerationOptions
from rmt_deploy.runtime.loop import last_tokens, never, run_segments
from rmt_deploy.runtime.stepper import Stepper
from rmt_deploy.runtime.tokens import ArraySource

NEW_TOKENS = 8


def compare_generation(reference: StepEngine, candidate: StepEngine,
                       initial_state: State, segments: int = 4,
                       new_tokens: int = NEW_TOKENS) -> dict:
    """Tokens and logits of greedy generation on both sides over the validation
    documents (batches of 3 and 1 rows, padded last segments): the candidate starts from
    the reference's state after each document's head (so only generation is judged)."""
    config = reference.config
    limit = config.max_positions
    if limit is not None:
        new_tokens = max(1, min(new_tokens, limit - context_slots(config)
                                - config.segment_size + 1))
    options = GenerationOptions(new_tokens)
    errors, same, rows = LoopErrors("generation"), 0, 0
    # batches of at most the rows both sides take at once (a TensorRT profile's), so that
    # each side generates the same rows together and their steps' logits pair up
    limit = min((side.max_batch for side in (reference, candidate)
                 if side.max_batch is not None), default=None)
    batches = [docs[i: i + (limit or len(docs))] for docs in
               validation_batches(config, segments, seed=1)
               for i in range(0, len(docs), limit or len(docs))]
    for docs in batches:
        sources = [ArraySource(doc, config) for doc in docs]
        lasts = [last_tokens(source, config) for source in sources]
        keys = list(range(len(sources)))
        with Stepper(reference) as expected, Stepper(candidate) as actual:
            for key in keys:
                expected.add(key, initial_state)
            run_segments(expected, sources, lambda *_: None, skip_last=True,
                         wants_logits=never)
            for key in keys:
                actual.add(key, expected.state(key))
            logits: dict[str, list[np.ndarray]] = {"expected": [], "actual": []}
            want = expected.generate(keys, lasts, options, logits["expected"].append)
            got = actual.generate(keys, lasts, options, logits["actual"].append)
        for index, (a, b) in enumerate(zip(logits["expected"], logits["actual"],
                                           strict=False)):
            name = "prefill_logits" if index == 0 else "decode_logits"
            errors.record(index, {name: a}, {name: b}, states=set())
        same += sum(w == g for w, g in zip(want, got, strict=True))
        rows += len(keys)
    return {**errors.to_dict(), "generated_same": same / rows, "rows": rows,
            "new_tokens": new_tokens}


def enforce_generation(results: dict, tolerance: float, what: str = "the export") -> None:
    """Raise ValidationError unless every row generated the reference's tokens with logits
    within ``tolerance`` and finite."""
    for name, count in results["non_finite"].items():
        if count:
            raise ValidationError(f"{what}: {count} value(s) of {name} are NaN or infinite "
                                  "while generating; the weights or the graphs are damaged")
    if results["generated_same"] < 1:
        raise ValidationError(f"{what} generates other tokens than the reference in "
                              f"{1 - results['generated_same']:.0%} of the validation rows")
    for name, error in results["max_abs"].items():
        if not error <= tolerance:
            raise ValidationError(f"generation error on {name} is {error:.3g}, above the "
                                  f"tolerance {tolerance:g}; the exported graphs do not "
                                  "reproduce the reference (loosen explicitly with --atol)")


