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


@pytest.mark.parametrize(
    ("changes", "words"),
    [  # the example: an encoder whose input size and memory give 57
        ({"input_size": 63, "num_mem_tokens": 3, "mem_token_ids": [27, 28, 29],
          "segment_size": 10}, ("segment_size 10", "input_size 63", "num_mem_tokens 3", "57")),
        ({"segment_size": 5}, ("segment_size 5", "input_size 16", "num_mem_tokens 4")),
        ({"alignment": "left"}, ("alignment 'left'", "variant 'encoder'")),
        ({"mem_token_ids": [1, 2, 3, 4]}, ("mem_token_ids [1, 2, 3, 4]", "vocab_size 30")),
    ],
)
def test_a_derived_field_that_contradicts_its_sources_is_refused(changes, words):
    data = {**make().to_dict(), **changes}
    with pytest.raises(ConfigError) as error:
        RMTConfig.from_dict(data)
    assert all(word in str(error.value) for word in words), str(error.value)


def test_a_decoder_input_size_that_contradicts_its_sources_is_refused():
    config = RMTConfig.decoder(num_mem_tokens=2, hidden_size=8, vocab_size=20, segment_size=4,
                               pad_token_id=0)
    with pytest.raises(ConfigError, match="input_size 9 contradicts segment_size 4 and "
                                          "num_mem_tokens 2, which give 8"):
        RMTConfig.from_dict({**config.to_dict(), "input_size": 9})
    with pytest.raises(ConfigError, match="alignment 'right' contradicts variant 'decoder'"):
        RMTConfig.from_dict({**config.to_dict(), "alignment": "right"})


def test_an_armt_config_round_trips_and_refuses_contradictions():
    config = RMTConfig.armt(num_mem_tokens=2, hidden_size=8, vocab_size=20, segment_size=4,
                            d_mem=3, correction=False, pad_token_id=0)
    assert RMTConfig.from_dict(config.to_dict()) == config
    assert (config.input_size, config.d_key, config.is_armt) == (6, 18, True)
    with pytest.raises(ConfigError, match="input_size 8 contradicts segment_size 4 and "
                                          "num_mem_tokens 2, which give 6"):
        RMTConfig.from_dict({**config.to_dict(), "input_size": 8})
    with pytest.raises(ConfigError, match="d_mem is set exactly for an armt"):
        RMTConfig.from_dict({**config.to_dict(), "d_mem": None})
    with pytest.raises(ConfigError, match="d_mem must be >= 1"):
        RMTConfig.from_dict({**config.to_dict(), "d_mem": 0})
    with pytest.raises(ConfigError, match="correction is 1, expected bool"):
        RMTConfig.from_dict({**config.to_dict(), "correction": 1})
    decoder = RMTConfig.decoder(num_mem_tokens=2, hidden_size=8, vocab_size=20,
                                segment_size=4, pad_token_id=0)
    with pytest.raises(ConfigError, match="d_mem is set exactly for an armt"):
        RMTConfig.from_dict({**decoder.to_dict(), "d_mem": 3})


def test_the_sliding_window_round_trips_and_old_configs_read_without_it():
    """A manifest written before the flag existed reads as an ARMT without the window; the
    window is an armt's only and its reach (the previous segment) must fit the base
    model's positions."""
    config = RMTConfig.armt(num_mem_tokens=2, hidden_size=8, vocab_size=20, segment_size=4,
                            d_mem=3, correction=False, pad_token_id=0, sliding_window=True,
                            max_positions=10)
    assert RMTConfig.from_dict(config.to_dict()) == config and config.sliding_window
    old = {key: value for key, value in config.to_dict().items() if key != "sliding_window"}
    assert RMTConfig.from_dict(old).sliding_window is False
    with pytest.raises(ConfigError, match="sliding_window is 1, expected bool"):
        RMTConfig.from_dict({**config.to_dict(), "sliding_window": 1})
    with pytest.raises(ConfigError, match="a step needs 10 positions but the base model has 9"):
        RMTConfig.from_dict({**config.to_dict(), "max_positions": 9})
    decoder = RMTConfig.decoder(num_mem_tokens=2, hidden_size=8, vocab_size=20,
                                segment_size=4, pad_token_id=0)
    with pytest.raises(ConfigError, match="sliding_window is set only for an armt"):
        RMTConfig.from_dict({**decoder.to_dict(), "sliding_window": True})
