"""Training the demo RMT on the memorization task, with the paper's curriculum over the
number of segments, and measuring its accuracy by input length."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers

from rmt_deploy.demo.evaluate import accuracy
from rmt_deploy.demo.task import CLS_ID, LABELS, PAD_ID, SEP_ID, VOCAB, MemorizeTask, tokenizer_json
from rmt_deploy.model.base import build_encoder_base
from rmt_deploy.model.checkpoint import save_checkpoint
from rmt_deploy.model.encoder import EncoderRMT
from rmt_deploy.model.factory import SpecialTokens, encoder_from_base
from rmt_deploy.model.loop import run_encoder
from rmt_deploy.runtime.backends.torch import TorchEngine
from rmt_deploy.runtime.model import RMTModel


@dataclass(frozen=True)
class TrainOptions:
    """The demo model and its curriculum (defaults: measured to reach 100% on CPU)."""

    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 512
    num_mem_tokens: int = 4
    input_size: int = 32  # 25 content tokens a segment
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 20  # linear warmup, restarted at every curriculum stage
    # (segments, steps) per stage; a fresh optimizer starts at each group
    curriculum: tuple[tuple[tuple[int, int], ...], ...] = (
        ((1, 200), (2, 200), (3, 200), (4, 200), (6, 200)),
        ((8, 100), (12, 100), (16, 100)),
    )
    mode: str = "memorize"
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def segment_size(self) -> int:
        return self.input_size - self.num_mem_tokens - 3

    @property
    def train_segments(self) -> int:
        return self.curriculum[-1][-1][0]


def new_demo_model(options: TrainOptions) -> EncoderRMT:
    """A randomly initialised encoder RMT over the demo vocabulary."""
    torch.manual_seed(options.seed)
    config = transformers.BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=options.hidden_size,
        num_hidden_layers=options.layers,
        num_attention_heads=options.heads,
        intermediate_size=options.intermediate_size,
        max_position_embeddings=options.input_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=len(LABELS),
        pad_token_id=PAD_ID,
    )
    return encoder_from_base(
        build_encoder_base(config),
        num_mem_tokens=options.num_mem_tokens,
        input_size=options.input_size,
        labels=LABELS,
        special=SpecialTokens(pad=PAD_ID, cls=CLS_ID, sep=SEP_ID),
    )


def train(options: TrainOptions, log: Callable[[str], None] = print) -> EncoderRMT:
    """Train a demo model through the curriculum; returns it in eval mode."""
    rmt = new_demo_model(options).train()
    task = MemorizeTask(options.mode)
    rng = np.random.default_rng(options.seed)
    started = time.perf_counter()
    for group in options.curriculum:
        optimizer = torch.optim.AdamW(rmt.parameters(), lr=options.lr, weight_decay=0.01)
        for n_segments, steps in group:
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: min(1.0, (step + 1) / options.warmup_steps)
            )
            n_tokens = n_segments * options.segment_size
            losses, hits = [], []
            for _ in range(steps):
                ids, labels = _batch(task, options.batch_size, n_tokens, rng)
                logits = run_encoder(rmt, list(ids)).logits
                loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(rmt.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                hits.append((logits.argmax(-1).numpy() == labels).mean())
            log(
                f"{n_segments:>3} segments: loss {np.mean(losses[-20:]):.4f}, "
                f"accuracy {np.mean(hits[-20:]):.3f}, {time.perf_counter() - started:.0f}s"
            )
    return rmt.eval()


def _batch(task: MemorizeTask, size: int, n_tokens: int, rng: np.random.Generator):
    samples = [task.sample_ids(n_tokens, rng) for _ in range(size)]
    return np.stack([ids for ids, _ in samples]), np.array([label for _, label in samples])


def save_demo(rmt: EncoderRMT, path: Path, options: TrainOptions) -> Path:
    """Write the trained demo model as an rmt-deploy checkpoint with its tokenizer."""
    config = rmt.rmt_config
    notes = {"task": options.mode, "train_segments": options.train_segments, **options.extra}
    rmt.rmt_config = type(config).from_dict({**config.to_dict(), "extra": notes})
    return save_checkpoint(rmt, path, tokenizer_json())


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Train the demo RMT on CPU.")
    parser.add_argument("output", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    options = TrainOptions(seed=args.seed)
    rmt = train(options)
    save_demo(rmt, args.output, options)
    model = RMTModel(TorchEngine(rmt), TorchEngine(rmt).initial_state())
    for factor in (1, 10):
        n = options.train_segments * factor
        print(f"accuracy at {n} segments: {accuracy(model, n, 200, seed=1000 + factor):.3f}")


if __name__ == "__main__":
    main()
