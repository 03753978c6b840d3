"""The demo trainer on a toy budget, and the committed demo model's accuracy."""

from pathlib import Path

import pytest
import torch

from rmt_deploy.demo.evaluate import accuracy
from rmt_deploy.demo.train import TrainOptions, save_demo, train
from rmt_deploy.errors import InputError
from rmt_deploy.model.checkpoint import load_checkpoint
from rmt_deploy.runtime import open_model

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo-rmt.pt"


def test_curriculum_trains_and_saves_a_self_describing_checkpoint(tmp_path):
    torch.set_num_threads(1)
    options = TrainOptions(hidden_size=32, layers=1, heads=2, intermediate_size=64,
                           batch_size=8, warmup_steps=2,
                           curriculum=(((1, 12),), ((2, 4),)))
    logged = []
    rmt = train(options, log=logged.append)
    assert [line.split()[0] for line in logged] == ["1", "2"]
    assert not rmt.training
    path = save_demo(rmt, tmp_path / "toy.pt", options)
    loaded = load_checkpoint(path)
    assert loaded.rmt.rmt_config.extra["train_segments"] == 2
    assert loaded.rmt.rmt_config.segment_size == options.segment_size
    assert loaded.tokenizer_json and "went" in loaded.tokenizer_json


def test_evaluation_refuses_a_model_of_another_task(encoder_checkpoint):
    with pytest.raises(InputError, match="demo task needs an encoder trained on it"):
        accuracy(open_model(encoder_checkpoint), 2, 4, seed=0)


@pytest.mark.skipif(not DEMO.exists(), reason="examples/demo-rmt.pt not committed")
def test_committed_demo_model_answers_at_and_beyond_its_training_length():
    model = open_model(DEMO)
    trained = model.config.extra["train_segments"]
    assert accuracy(model, trained, 40, seed=11, batch_size=40) >= 0.95
    assert accuracy(model, 4 * trained, 20, seed=12, batch_size=20) >= 0.95
