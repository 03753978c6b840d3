"""References that generation is tested against: a sampler of temperature -> top-k ->
top-p written out in numpy (the random stream used as the runtime uses it: one
``Generator.choice`` a row and token), the PyTorch reference model generating from a
given memory, and the runtime generating one document through an engine, with the
logits of every step."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rmt_deploy.model.loop import run_decoder
from rmt_deploy.runtime.backends.base import State, StepEngine
from rmt_deploy.runtime.generation import GenerationOptions
from rmt_deploy.runtime.stepper import Stepper
from rmt_deploy.segmentation import segment_bounds

# segment_size 5: 0, 1, 2, 3 and 4 segments written before the last is read
LENGTHS = (4, 8, 9, 12, 13, 17, 19, 23)
DOCS = [np.random.default_rng(7 + n).integers(0, 59, n).tolist() for n in LENGTHS]  # no EOS
GREEDY = GenerationOptions(6)
SAMPLED = GenerationOptions(6, temperature=0.7, top_k=12, top_p=0.9, seed=5)


def kept_tokens(logits: np.ndarray, options: GenerationOptions) -> tuple[np.ndarray, np.ndarray]:
    """The tokens a sampler may draw from one row of logits and their probabilities:
    softmax(logits / T); the ``top_k`` most likely; of those, renormalized, the fewest
    whose probability reaches ``top_p`` (as Hugging Face's warpers chain them)."""
    scaled = logits.astype(np.float64) / options.temperature
    probabilities = np.exp(scaled - scaled.max())
    probabilities /= probabilities.sum()
    order = np.argsort(-probabilities, kind="stable")
    if options.top_k:
        order = order[: options.top_k]
    if options.top_p < 1:
        cumulative = np.cumsum(probabilities[order]) / probabilities[order].sum()
        reached = np.flatnonzero(cumulative >= options.top_p)
        order = order[: reached[0] + 1 if reached.size else len(order)]
    kept = probabilities[order]
    return order, kept / kept.sum()


def reference_choice(logits: np.ndarray, options: GenerationOptions,
                     rng: np.random.Generator) -> np.ndarray:
    """Each row's next token [rows]: argmax when greedy, else a draw from its kept tokens."""
    if options.greedy:
        return logits.argmax(axis=-1)
    picked = []
    for row in logits:
        order, probabilities = kept_tokens(row, options)
        picked.append(order[rng.choice(len(order), p=probabilities)])
    return np.array(picked, dtype=np.int64)


def reference_loop(step_logits: Sequence[np.ndarray], options: GenerationOptions,
                   eos: int) -> list[list[int]]:
    """The tokens a batch generates from the logits each step saw [rows, vocab]: every
    row draws at every step, a row keeps its tokens up to and with its EOS, and the
    batch stops when every row is done or after ``max_new_tokens``."""
    rng = np.random.default_rng(options.seed)
    rows = len(step_logits[0])
    generated: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for count, logits in enumerate(step_logits, start=1):
        for row, token in enumerate(reference_choice(logits, options, rng).tolist()):
            if not done[row]:
                generated[row].append(token)
                done[row] = token == eos
        if all(done) or count == options.max_new_tokens:
            assert count == len(step_logits), "the batch went on after it was done"
    return generated


def memory_before(rmt, doc: Sequence[int], unwritten: int = 1) -> torch.Tensor:
    """The reference's memory [1, M, H] after every segment of ``doc`` but its last
    ``unwritten`` ones (the memory generation reads with ``unwritten=1``)."""
    starts = [start for start, _ in segment_bounds(len(doc), rmt.rmt_config)]
    head = list(doc[: starts[-unwritten]]) if unwritten <= len(starts) else []
    memory = run_decoder(rmt, [head]).memory if head else rmt.initial_memory(1)
    return memory.detach()


@torch.no_grad()
def reference_generation(rmt, doc: Sequence[int], memory: torch.Tensor,
                         options: GenerationOptions) -> tuple[list[int], list[np.ndarray]]:
    """The tokens the reference generates after ``doc``'s last segment, read whole from
    ``memory`` at every token (no KV cache), and the logits each token was chosen from."""
    start = segment_bounds(len(doc), rmt.rmt_config)[-1][0]
    tokens = torch.tensor([list(doc[start:])])
    rng = np.random.default_rng(options.seed)
    generated, seen = [], []
    for _ in range(options.max_new_tokens):
        logits = rmt.read(tokens, torch.ones_like(tokens), memory)[:, -1].double().numpy()
        seen.append(logits[0])
        token = int(reference_choice(logits, options, rng)[0])
        generated.append(token)
        if token == rmt.rmt_config.eos_token_id:
            break
        tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
    return generated, seen


@torch.no_grad()
def reference_armt_generation(rmt, doc: Sequence[int], options: GenerationOptions
                              ) -> tuple[list[int], list[np.ndarray]]:
    """The tokens the reference ARMT generates after ``doc``: every segment but the last
    written (no window), the last read whole from that state at every token (reads, no
    memory slots, no writes, no KV cache), and the logits each token was chosen from."""
    from rmt_deploy.model.armt import run_armt

    start = segment_bounds(len(doc), rmt.rmt_config)[-1][0]
    state = run_armt(rmt, list(doc[:start]), window=False)[1] if start else \
        rmt.zero_state(1, False)
    tokens = torch.tensor([list(doc[start:])])
    rng = np.random.default_rng(options.seed)
    generated, seen = [], []
    for _ in range(options.max_new_tokens):
        logits = rmt.read(tokens, torch.ones_like(tokens), *state)[:, -1].double().numpy()
        seen.append(logits[0])
        token = int(reference_choice(logits, options, rng)[0])
        generated.append(token)
        if token == rmt.rmt_config.eos_token_id:
            break
        tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
    return generated, seen


def runtime_generation(engine: StepEngine, initial_state: State, doc: Sequence[int],
                       options: GenerationOptions) -> tuple[list[int], list[np.ndarray]]:
    """The tokens ``engine`` generates after ``doc`` (every segment but the last written,
    the last read by prefill and decode) and the logits of every step."""
    ids = np.asarray(doc, dtype=np.int64)
    bounds = segment_bounds(len(ids), engine.config)
    seen: list[np.ndarray] = []
    with Stepper(engine) as stepper:
        stepper.add(0, initial_state)
        for start, end in bounds[:-1]:
            stepper.step([0], [ids[start:end]], logits=False)
        (generated,) = stepper.generate([0], [ids[bounds[-1][0]:]], options,
                                        on_logits=lambda logits: seen.append(logits[0].copy()))
    return generated, seen


def written(doc: Sequence[int], config) -> int:
    """Segments written before generation reads the last."""
    return len(segment_bounds(len(doc), config)) - 1


def check_backend_generation(engine, initial_state, reference) -> None:
    """Greedy and sampled generation on ``engine`` after every document of DOCS equal the
    reference's, token for token, and the logits of every step equal the reference's."""
    config = reference.rmt_config
    assert {written(doc, config) % 2 for doc in DOCS} == {0, 1}
    for doc in DOCS:
        memory = memory_before(reference, doc)
        for options in (GREEDY, SAMPLED):
            expected, expected_logits = reference_generation(reference, doc, memory, options)
            ids, logits = runtime_generation(engine, initial_state, doc, options)
            assert ids == expected, (written(doc, config), options)
            for got, want in zip(logits, expected_logits, strict=True):
                np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
