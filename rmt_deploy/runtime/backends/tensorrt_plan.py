"""Where a TensorRT plan may run: the compatibility check made before deserializing it.
Pure Python, so it is tested without TensorRT."""

from __future__ import annotations

from typing import Any

from rmt_deploy.errors import BackendError


def check_compatible(record: dict[str, Any], tensorrt_version: str, gpu_name: str,
                     compute_capability: str) -> None:
    """Refuse a plan built for another TensorRT version or GPU, before deserializing it
    (TensorRT itself fails there with an opaque error)."""
    built = record.get("tensorrt")
    if built != tensorrt_version:
        raise BackendError(
            f"{record.get('file', 'plan')} was built with TensorRT {built}, this host has "
            f"{tensorrt_version}; rebuild it here with rmt-export --engine")
    if record.get("compute_capability") != compute_capability:
        raise BackendError(
            f"{record.get('file', 'plan')} was built for {record.get('gpu')} (compute "
            f"capability {record.get('compute_capability')}), this GPU is {gpu_name} "
            f"({compute_capability}); rebuild it here with rmt-export --engine")
