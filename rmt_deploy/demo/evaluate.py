"""Accuracy of a model on the memorization task, by input length, on any backend."""

from __future__ import annotations

import numpy as np

from rmt_deploy.demo.task import LABELS, MemorizeTask
from rmt_deploy.errors import InputError
from rmt_deploy.runtime.model import RMTModel


def accuracy(model: RMTModel, n_segments: int, n_samples: int, seed: int,
             mode: str = "memorize", batch_size: int = 50) -> float:
    """Share of fresh samples of ``n_segments`` full segments answered correctly."""
    config = model.config
    if not config.is_encoder or set(config.labels) != set(LABELS):
        raise InputError("the demo task needs an encoder trained on it (labels "
                         f"{','.join(LABELS)}); got labels {','.join(config.labels)}")
    task = MemorizeTask(mode)
    rng = np.random.default_rng(seed)
    n_tokens = n_segments * config.segment_size
    correct = 0
    for start in range(0, n_samples, batch_size):
        count = min(batch_size, n_samples - start)
        samples = [task.sample_ids(n_tokens, rng) for _ in range(count)]
        run = model.run([ids for ids, _ in samples])
        for output, (_, label) in zip(run.outputs, samples, strict=True):
            correct += int(config.labels.index(output.label) == label)
    return correct / n_samples

