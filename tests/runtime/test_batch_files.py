"""A batch of file documents holds one spool file, however many documents it has."""

from __future__ import annotations

import os
import resource

import numpy as np
import pytest

from rmt_deploy.runtime import open_model


def test_a_batch_of_1100_files_runs_within_a_small_descriptor_limit(encoder_export, tmp_path):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("counts open files in /proc")
    model = open_model(encoder_export, threads=1)
    files = []
    for index, words in enumerate((7, 25, 60)):  # 1, 3 and 7 segments: rows of each length
        files.append(tmp_path / f"doc{index}.txt")
        files[-1].write_text(" ".join(f"w{(5 * i + index) % 45}" for i in range(words)))
    alone = [model.run_one(file) for file in files]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 64, hard))
    try:
        run = model.run([files[i % 3] for i in range(1100)])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for index, output in enumerate(run.outputs):
        np.testing.assert_array_equal(output.logits, alone[index % 3].logits)
        assert output.tokens == alone[index % 3].tokens
