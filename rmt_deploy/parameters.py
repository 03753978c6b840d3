"""Click parameter types shared by the commands: each refuses a bad value when the
command line is parsed (a usage error, exit status 2), before any work."""

from __future__ import annotations

import math
import sys

import click

#: Seeds every random stream accepts (numpy's legacy seeding, torch): 32 bits.
MAX_SEED = 2**32 - 1


class FiniteFloat(click.FloatRange):
    """A finite float within a range: NaN and infinity are refused (click's FloatRange
    lets NaN through any bound)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


class Temperature(click.ParamType):
    """0 (greedy), or a positive normal float: a subnormal one overflows the scaled
    logits."""

    name = "temperature"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if number != 0 and not (math.isfinite(number) and number >= sys.float_info.min):
            self.fail(f"{value!r}: give 0 (greedy) or a positive finite number of at least "
                      f"{sys.float_info.min:.1e}, such as 0.8", param, ctx)
        return number


SEED = click.IntRange(0, MAX_SEED)
#: An error bound that must be positive (an atol of 0 fails on any rounding).
TOLERANCE = FiniteFloat(min=0, min_open=True)
SHARE = FiniteFloat(0, 1)  # a share of predictions
COSINE = FiniteFloat(-1, 1)
POSITIVE_SECONDS = FiniteFloat(min=0, min_open=True)


def sampling_options(command):
    """--temperature, --top-k, --top-p and --seed: how ``--generate`` samples, alike in
    every command that generates."""
    options = [
        click.option("--temperature", type=Temperature(), default=0.0, show_default=True,
                     help="--generate: sample from softmax(logits / T); 0 is greedy."),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
                     help="--generate sampling: only the K most likely tokens (0: all)."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0,
                     show_default=True, help="--generate sampling: the smallest set of "
                     "tokens whose probability (after the temperature and renormalized "
                     "over the top k) reaches P."),
        click.option("--seed", type=SEED, help="--generate sampling: the random seed."),
    ]
    for option in reversed(options):
        command = option(command)
    return command
