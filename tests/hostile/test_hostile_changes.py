"""Exports that change under the tool or contradict themselves: a folder replaced or a
file changed in place while a run uses it, and a manifest whose derived config fields
disagree with the fields they derive from, hashes updated (harness:
tests/hostile/harness.py)."""

from __future__ import annotations

import pytest
from harness import Case, build_assets, run_case
from test_hostile_models import _config, _tampered


@pytest.fixture(scope="module")
def assets(encoder_checkpoint, encoder_export, tmp_path_factory):
    return build_assets(encoder_checkpoint, encoder_export, tmp_path_factory.mktemp("assets"))


CASES = [  # the example, on the tiny encoder: input 16 and 3 memory tokens give 10
    Case("export-config-segment-size-contradicts-input-size", "rmt-run",
         _tampered(_config(segment_size=5)),
         says=("rmt.json", "segment_size 5", "input_size 16", "num_mem_tokens 3", "give 10")),
    Case("export-config-alignment-contradicts-variant", "rmt-run",
         _tampered(_config(alignment="left")),
         says=("rmt.json", "alignment 'left'", "variant 'encoder'")),
    Case("export-config-memory-ids-contradict-vocabulary", "rmt-run",
         _tampered(_config(mem_token_ids=[5, 6, 7])),
         says=("rmt.json", "mem_token_ids [5, 6, 7]", "vocab_size 53")),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_change(case, assets, tmp_path):
    run_case(case, tmp_path, assets)
