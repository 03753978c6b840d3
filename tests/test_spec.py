import pytest

from rmt_deploy.errors import ConfigError
from rmt_deploy.spec import RMTConfig


def make(**kwargs) -> RMTConfig:
    values = dict(
        num_mem_tokens=4, hidden_size=8, vocab_size=30, input_size=16, pad_token_id=0,
        cls_token_id=1, sep_token_id=2, strip_token_ids=(0, 1, 2), labels=("x", "y"),
    )
    values.update(kwargs)
    return RMTConfig.encoder(**values)


def test_round_trip_through_dict():
    config = make(extra={"task": "memorize"})
    assert RMTConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_size": 7}, "raise --input-size"),
        ({"num_mem_tokens": 0}, "num_mem_tokens must be >= 1"),
        ({"labels": ()}, "needs its class labels"),
        ({"labels": ("x", "x")}, "labels must be distinct"),
        ({"max_n_segments": 0}, "max_n_segments"),
    ],
)
def test_invalid_configs_say_what_is_wrong(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make(**kwargs)


def test_unknown_keys_are_refused():
    with pytest.raises(ConfigError, match="unknown keys colour"):
        RMTConfig.from_dict({**make().to_dict(), "colour": "red"})
