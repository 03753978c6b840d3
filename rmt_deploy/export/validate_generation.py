"""Proof that an export generates as the reference does: after the same documents, from
the same state, both sides generate greedily with their KV-cache graphs (prefill, then
one decode step a token); the tokens must be the same and the logits of every step close
(a step's logits are compared in the rows whose tokens so far are the same on both
sides: after a row's tokens part, its logits follow other histories)."""

from __future__ import annotations

import numpy as np

from rmt_deploy.contract import context_slots
from rmt_deploy.errors import ValidationError
from rmt_deploy.export.comparator import LoopErrors, rows_at_once, validation_batches
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
    documents (padded last segments; batches of 3 and 1 rows, cut to the rows both sides
    take at once): the candidate starts from the reference's state after each document's
    head (so only generation is judged). ``generated_same``: the share of rows that
    generate the same tokens."""
    config = reference.config
    positions = config.max_positions
    if positions is not None:
        new_tokens = max(1, min(new_tokens, positions - context_slots(config)
                                - config.segment_size + 1))
    options = GenerationOptions(new_tokens)
    errors, same, rows = LoopErrors("generation"), 0, 0
    # each side generates the same rows together, so that their steps' logits pair up
    step_rows = rows_at_once(reference, candidate)
    batches = [docs[i: i + (step_rows or len(docs))] for docs in
               validation_batches(config, segments, seed=1)
               for i in range(0, len(docs), step_rows or len(docs))]
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
            tokens: dict[str, list[np.ndarray]] = {"expected": [], "actual": []}
            want = expected.generate(keys, lasts, options, logits["expected"].append,
                                     tokens["expected"].append)
            got = actual.generate(keys, lasts, options, logits["actual"].append,
                                  tokens["actual"].append)
        alike = np.ones(len(keys), dtype=bool)  # rows whose tokens so far are the same
        for index, (a, b) in enumerate(zip(logits["expected"], logits["actual"],
                                           strict=False)):
            name = "prefill_logits" if index == 0 else "decode_logits"
            if alike.any():
                errors.record(index, {name: a[alike]}, {name: b[alike]}, states=set())
            alike &= tokens["expected"][index] == tokens["actual"][index]
        same += sum(w == g for w, g in zip(want, got, strict=True))
        rows += len(keys)
    return {**errors.to_dict(), "generated_same": same / rows, "rows": rows,
            "new_tokens": new_tokens}


def enforce_generation(results: dict, what: str, reference: str,
                       tolerance: float | None, min_same: float = 1.0,
                       advice: str = "") -> None:
    """Raise ValidationError when generation was not finite, when fewer than
    ``min_same`` of the rows generated ``reference``'s tokens, or (``tolerance`` given)
    when a logit error is above it; ``advice`` ends each message."""
    for name, count in results["non_finite"].items():
        if count:
            raise ValidationError(f"{what}: {count} value(s) of {name} are NaN or infinite "
                                  f"while generating{advice}")
    if results["generated_same"] < min_same:
        raise ValidationError(f"{what}: {results['generated_same']:.0%} of the validation "
                              f"rows generate {reference}'s tokens, below "
                              f"{min_same:.0%}{advice}")
    for name, error in results["max_abs"].items():
        if tolerance is not None and not error <= tolerance:
            raise ValidationError(f"{what}: generation error on {name} is {error:.3g}, above "
                                  f"the tolerance {tolerance:g}{advice}")
