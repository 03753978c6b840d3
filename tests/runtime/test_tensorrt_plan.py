"""What feeds TensorRT, tested without it: profiles, compatibility checks, and the clear
message where TensorRT is missing."""

import importlib.util

import pytest
from conftest import make_decoder, make_encoder

from rmt_deploy.errors import BackendError, ConfigError
from rmt_deploy.manifest import ATTENTION_MASK, INPUT_IDS, MEMORY_IN, READ_GRAPH, STEP_GRAPH
from rmt_deploy.runtime.backends.tensorrt_plan import (
    BatchProfile,
    check_compatible,
    profile_shapes,
)

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_encoder_profile_fixes_the_segment_and_spans_the_batch():
    config = make_encoder(input_size=16, num_mem_tokens=3).rmt_config
    shapes = profile_shapes(config, STEP_GRAPH, BatchProfile(1, 4, 8))
    assert shapes[INPUT_IDS] == ((1, 16), (4, 16), (8, 16))
    assert shapes[ATTENTION_MASK] == shapes[INPUT_IDS]
    assert shapes[MEMORY_IN] == ((1, 3, 32), (4, 3, 32), (8, 3, 32))


def test_decoder_profiles_leave_room_for_short_segments_and_generation():
    config = make_decoder(num_mem_tokens=2, segment_size=5).rmt_config
    step = profile_shapes(config, STEP_GRAPH, BatchProfile(1, 2, 4))
    assert step[INPUT_IDS] == ((1, 1), (2, 5), (4, 5))
    read = profile_shapes(config, READ_GRAPH, BatchProfile(1, 1, 1), max_new_tokens=100)
    assert read[INPUT_IDS] == ((1, 1), (1, 5), (1, 64 - 2))  # capped by 64 positions


@pytest.mark.parametrize(("text", "expected"), [("8", (1, 8, 8)), ("1,4,16", (1, 4, 16))])
def test_batch_option_parses(text, expected):
    profile = BatchProfile.parse(text)
    assert (profile.min, profile.opt, profile.max) == expected


@pytest.mark.parametrize("text", ["0", "4,2,8", "1,2", "a"])
def test_bad_batch_options_say_how_to_fix(text):
    with pytest.raises(ConfigError, match="--batch"):
        BatchProfile.parse(text)


RECORD = {"file": "model.plan", "tensorrt": "10.13.0", "gpu": "NVIDIA H200",
          "compute_capability": "9.0"}


def test_a_plan_from_the_same_tensorrt_and_gpu_is_accepted():
    check_compatible(RECORD, "10.13.0", "NVIDIA H200", "9.0")


@pytest.mark.parametrize(("version", "gpu", "capability", "words"), [
    ("11.0.1", "NVIDIA H200", "9.0", "built with TensorRT 10.13.0, this host has 11.0.1"),
    ("10.13.0", "NVIDIA L4", "8.9", "built for NVIDIA H200 (compute capability 9.0)"),
])
def test_a_plan_from_elsewhere_is_refused_before_deserializing(version, gpu, capability, words):
    with pytest.raises(BackendError, match="rebuild it here") as error:
        check_compatible(RECORD, version, gpu, capability)
    assert words in str(error.value)


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_without_tensorrt_the_backend_says_how_to_install_it(encoder_export):
    from rmt_deploy.runtime import open_model

    with pytest.raises(BackendError, match="pip install tensorrt"):
        open_model(encoder_export, backend="tensorrt")
