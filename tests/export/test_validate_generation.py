"""Generation compared as export validation and the TensorRT plan check compare it: a
step's logits are compared only in the rows whose tokens so far agree (after a row's
tokens part, its logits follow another history and say nothing of the candidate)."""

from __future__ import annotations

import numpy as np
import pytest

from rmt_deploy.errors import ValidationError
from rmt_deploy.export.validate_generation import compare_generation, enforce_generation
from rmt_deploy.manifest import read_manifest
from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine
from rmt_deploy.runtime.backends.wrapped import WrappedEngine, WrappedState

SHIFT = 50.0  # added to one logit of the first row's prefill: its first token changes


class FirstRowElsewhere(WrappedEngine):
    """An engine whose prefill makes the first row pick another first token."""

    def wrap(self, state):
        return _Elsewhere(self, state)


class _Elsewhere(WrappedState):
    def prefill(self, input_ids, attention_mask, capacity=None):
        logits, cache = super().prefill(input_ids, attention_mask, capacity)
        logits = logits.copy()
        logits[0, np.argmin(logits[0])] += SHIFT
        return logits, cache


def test_logits_after_a_row_parts_are_not_compared(decoder_export):
    manifest = read_manifest(decoder_export)
    reference = OnnxRuntimeEngine(manifest)
    candidate = FirstRowElsewhere(OnnxRuntimeEngine(manifest))
    results = compare_generation(reference, candidate, manifest.load_initial_state())
    assert results["generated_same"] == pytest.approx(2 / 4)  # each batch's first row
    assert results["max_abs"]["prefill_logits"] > SHIFT / 2
    assert results["max_abs"]["decode_logits"] < 1e-4  # the rows that agree
    with pytest.raises(ValidationError, match=r"^the plans: 50% of the validation rows "
                                              r"generate FP32's tokens, below 99%; why$"):
        enforce_generation(results, "the plans", "FP32", None, 0.99, "; why")
    with pytest.raises(ValidationError, match=r"^the plans: generation error on "
                                              r"prefill_logits is .*, above the tolerance 1$"):
        enforce_generation(results, "the plans", "FP32", 1.0, 0.5)
