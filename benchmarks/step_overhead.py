"""Where a run's time goes: tokenizing, the engine's steps, and the loop around them.

A run of ``RMTModel.run`` on one document with its engine wrapped so that every
``EngineState.step`` is timed: engine time is the sum of those; tokenizing is timed
alone on the same document; the loop time is the rest (segmenting, laying out step
tensors, the stepper's bookkeeping, progress, results).

Usage: python benchmarks/step_overhead.py EXPORT INPUT [--backend B] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import ExitStack
from pathlib import Path

from rmt_deploy.runtime import RMTModel, open_model
from rmt_deploy.runtime.backends.base import EngineState, StepEngine
from rmt_deploy.runtime.backends.wrapped import WrappedEngine, WrappedState
from rmt_deploy.runtime.tokens import document_source


class TimedEngine(WrappedEngine):
    """The engine, with the time spent in its states' steps added up."""

    def __init__(self, engine: StepEngine) -> None:
        super().__init__(engine)
        self.seconds, self.steps = 0.0, 0

    def wrap(self, state: EngineState) -> EngineState:
        return _TimedState(self, state)


class _TimedState(WrappedState):
    def step(self, input_ids, attention_mask, logits=True):
        started = time.perf_counter()
        result = super().step(input_ids, attention_mask, logits)
        self.owner.seconds += time.perf_counter() - started
        self.owner.steps += 1
        return result


def split(model: RMTModel, document: Path) -> dict[str, float]:
    """Seconds of one run of ``document``: total, tokenizing, engine, loop; and ms per step
    of the engine and of the loop."""
    with ExitStack() as stack:
        started = time.perf_counter()
        source = document_source(document, model.tokenizer, model.config, stack, "input")
        tokenize = time.perf_counter() - started
        del source
    timed = TimedEngine(model.engine)
    run = RMTModel(timed, model.initial_state, model.tokenizer, model.description,
                   model.choice).run([document])
    loop = run.seconds - tokenize - timed.seconds
    return {"segments": run.segments, "tokens": run.tokens, "seconds": run.seconds,
            "tokenize_s": tokenize, "engine_s": timed.seconds, "loop_s": loop,
            "engine_ms_per_step": 1000 * timed.seconds / timed.steps,
            "loop_ms_per_step": 1000 * loop / timed.steps, "backend": run.backend,
            "choice": model.choice.describe() if model.choice else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("input", type=Path)
    parser.add_argument("--backend")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    model = open_model(args.export, backend=args.backend, threads=args.threads)
    print(json.dumps(split(model, args.input), indent=1))


if __name__ == "__main__":
    main()
