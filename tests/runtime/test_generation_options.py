"""Generation options are checked where they are made; sampling stays finite at any
temperature they accept."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from rmt_deploy.errors import InputError
from rmt_deploy.runtime.generation import GenerationOptions, TokenChooser


@pytest.mark.parametrize("bad", [
    {"temperature": 1e-320}, {"temperature": float("nan")}, {"temperature": float("inf")},
    {"temperature": -0.5}, {"seed": -1}, {"seed": 1.5}, {"seed": True},
])
def test_bad_temperatures_and_seeds_are_refused(bad):
    with pytest.raises(InputError):
        GenerationOptions(4, **{"temperature": 1.0, **bad})


def test_the_smallest_normal_temperature_samples_the_argmax():
    logits = np.array([[5.0, 3.0, -2.0, 4.0], [-1.0, 0.0, 7.0, 6.5]], dtype=np.float32)
    choose = TokenChooser(GenerationOptions(1, temperature=sys.float_info.min, seed=0))
    np.testing.assert_array_equal(choose(logits), [0, 2])
