"""What feeds TensorRT, tested without it: compatibility checks, and the clear message
where TensorRT is missing (profiles: tests/test_contract.py)."""

import importlib.util

import pytest

from rmt_deploy.errors import BackendError
from rmt_deploy.runtime.backends.tensorrt_plan import check_compatible

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


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
