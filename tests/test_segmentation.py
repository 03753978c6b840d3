import re
from pathlib import Path

import numpy as np
import pytest

from rmt_deploy.segmentation import (
    batch_schedule,
    clean_ids,
    count_segments,
    first_size,
    segment_bounds,
    segment_end,
    step_inputs,
    stream_first_sizes,
)
from rmt_deploy.spec import RMTConfig


def encoder_config(**kwargs) -> RMTConfig:
    values = dict(
        num_mem_tokens=2, hidden_size=8, vocab_size=20, input_size=9, pad_token_id=0,
        cls_token_id=1, sep_token_id=2, strip_token_ids=(0, 1, 2), labels=("x", "y"),
    )
    values.update(kwargs)
    return RMTConfig.encoder(**values)


def decoder_config() -> RMTConfig:
    return RMTConfig.decoder(num_mem_tokens=2, hidden_size=8, vocab_size=20, segment_size=4,
                             pad_token_id=0)


def test_encoder_segment_size_leaves_room_for_layout():
    config = encoder_config()
    assert config.segment_size == 9 - 2 - 3
    assert config.mem_token_ids == (18, 19)


def test_right_alignment_puts_the_remainder_first():
    config = encoder_config()  # segment size 4
    assert segment_bounds(10, config) == [(0, 2), (2, 6), (6, 10)]
    assert segment_bounds(8, config) == [(0, 4), (4, 8)]
    assert segment_bounds(3, config) == [(0, 3)]
    assert segment_bounds(0, config) == []


def test_left_alignment_puts_the_remainder_last():
    config = decoder_config()
    assert segment_bounds(10, config) == [(0, 4), (4, 8), (8, 10)]
    assert count_segments(10, config) == 3


@pytest.mark.parametrize("config", [encoder_config(), decoder_config()],
                         ids=["right", "left"])
def test_bounds_tile_the_document_with_full_segments_but_one(config):
    """Every length around segment boundaries: the segments cover 0..n in order, all full
    but the first (right alignment) or the last (left alignment)."""
    size = config.segment_size
    for n in range(1, 5 * size + 2):
        bounds = segment_bounds(n, config)
        assert [start for start, _ in bounds] == [0] + [end for _, end in bounds[:-1]]
        assert bounds[-1][1] == n and len(bounds) == count_segments(n, config)
        lengths = [end - start for start, end in bounds]
        short = 0 if config.alignment == "right" else len(bounds) - 1
        assert 1 <= lengths[short] <= size
        assert all(length == size for i, length in enumerate(lengths) if i != short)
        assert first_size(n, config) == (lengths[0] if config.alignment == "right" else size)


@pytest.mark.parametrize("config", [encoder_config(), decoder_config()],
                         ids=["right", "left"])
def test_a_stream_follows_the_bounds_of_its_final_length(config):
    """A stream that does not know its length walks segment_end from each first size it
    follows; the one its final length picks gives exactly segment_bounds."""
    size = config.segment_size
    firsts = stream_first_sizes(None, config)
    assert firsts == (list(range(1, size + 1)) if config.alignment == "right" else [size])
    for n in range(1, 5 * size + 2):
        first = first_size(n, config)
        assert first in firsts and stream_first_sizes(n, config) == [first]
        walked, start = [], 0
        while start < n:
            end = min(segment_end(start, first, config), n)
            walked.append((start, end))
            start = end
        assert walked == segment_bounds(n, config)


def test_a_known_length_beyond_max_n_segments_follows_the_head():
    config = encoder_config(max_n_segments=2)  # segment size 4: the head is 8 tokens
    assert stream_first_sizes(11, config) == [4]
    assert stream_first_sizes(7, config) == [3]


def test_segment_arithmetic_lives_in_segmentation_only():
    """No module but segmentation.py (and the reference model) computes where segments
    start or end: a modulo by the segment size, a first-segment choice, a ceil division
    or a range stepping by it."""
    package = Path(__file__).resolve().parents[1] / "rmt_deploy"
    pattern = re.compile(r"%\s*[\w.]*size\b|==\s*0\s+else\s+[\w.]*size\b"
                         r"|//\s*[\w.]*segment_size|range\([^)]*,\s*-?[\w.]*segment_size\)")
    found = [f"{path.relative_to(package)}:{number}: {line.strip()}"
             for path in sorted(package.rglob("*.py"))
             if path.name != "segmentation.py"
             and "model" not in path.relative_to(package).parts
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if pattern.search(line)]
    assert found == []


def test_clean_strips_special_tokens_and_keeps_the_head():
    config = encoder_config(max_n_segments=2)
    ids = [1, 5, 0, 6, 2, 7, 8, 9, 10, 11, 12, 13, 14]
    assert clean_ids(ids, config).tolist() == [5, 6, 7, 8, 9, 10, 11, 12]


def test_schedule_skips_early_steps_when_right_aligned():
    config = encoder_config()
    assert list(batch_schedule([3, 1, 2], config)) == [
        [(0, 0)],
        [(0, 1), (2, 0)],
        [(0, 2), (1, 0), (2, 1)],
    ]


def test_schedule_skips_late_steps_when_left_aligned():
    assert list(batch_schedule([3, 1, 2], decoder_config())) == [
        [(0, 0), (1, 0), (2, 0)],
        [(0, 1), (2, 1)],
        [(0, 2)],
    ]


def test_encoder_layout():
    config = encoder_config()
    ids, mask = step_inputs([np.array([5, 6, 7, 8]), np.array([9])], config)
    assert ids.tolist() == [[1, 18, 19, 2, 5, 6, 7, 8, 2], [1, 18, 19, 2, 9, 2, 0, 0, 0]]
    assert mask.tolist() == [[1] * 9, [1] * 6 + [0] * 3]


def test_decoder_inputs_are_right_padded():
    ids, mask = step_inputs([np.array([5, 6, 7]), np.array([9])], decoder_config())
    assert ids.tolist() == [[5, 6, 7], [9, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_oversized_segment_is_refused():
    with pytest.raises(ValueError, match="exceeds segment_size"):
        step_inputs([np.arange(5)], encoder_config())
