"""The saved-state container: a JSON header and raw numpy arrays, sealed by a sha256, so
a state reads back exactly, a damaged or truncated one is refused, and nothing in a file
is ever executed (no pickle).

Layout: ``MAGIC`` | header length (8 bytes, little-endian) | header (UTF-8 JSON, its
``arrays`` entry gives each array's dtype, shape and byte offset) | array bytes | sha256
of everything before it (32 bytes).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from rmt_deploy.errors import InputError
from rmt_deploy.files import atomic_path

MAGIC = b"RMTSTATE1\n"
DTYPES = ("float32", "float64", "int64")  # all a state holds; never object arrays


def pack(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """One state as bytes."""
    blobs, entries, offset = [], {}, 0
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        if array.dtype.name not in DTYPES:
            raise TypeError(f"state array {name} has dtype {array.dtype}")
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        entries[name] = {"dtype": array.dtype.name, "shape": list(array.shape),
                         "offset": offset, "bytes": len(data)}
        blobs.append(data)
        offset += len(data)
    head = json.dumps({**header, "arrays": entries}).encode()
    body = b"".join([MAGIC, len(head).to_bytes(8, "little"), head, *blobs])
    return body + hashlib.sha256(body).digest()


def unpack(data: bytes, name: str = "state") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Inverse of :func:`pack`; anything damaged is an InputError naming ``name``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InputError(f"{name}: a saved state is bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data.startswith(MAGIC):
        raise InputError(f"{name}: not an rmt-deploy session state; pass what "
                         "StreamSession.save() or rmt-run --state-file wrote")
    body, seal = data[:-32], data[-32:]
    if len(data) < len(MAGIC) + 8 + 32 or hashlib.sha256(body).digest() != seal:
        raise InputError(f"{name}: state is truncated or damaged (its checksum does not "
                         "match); use an intact copy or start over")
    size = int.from_bytes(body[len(MAGIC): len(MAGIC) + 8], "little")
    start = len(MAGIC) + 8 + size
    try:
        header = json.loads(body[len(MAGIC) + 8: start])
        arrays = {}
        for key, entry in header.pop("arrays").items():
            if entry["dtype"] not in DTYPES:
                raise ValueError(f"dtype {entry['dtype']}")
            blob = body[start + entry["offset"]: start + entry["offset"] + entry["bytes"]]
            arrays[key] = np.frombuffer(blob, dtype=np.dtype(entry["dtype"]).newbyteorder(
                "<")).astype(entry["dtype"]).reshape(entry["shape"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(f"{name}: state is malformed ({error}); it was not written by "
                         "rmt-deploy") from None
    return header, arrays


def write_state(path: str | Path, data: bytes) -> Path:
    """Write a packed state atomically: a crash leaves the previous state, never half."""
    path = Path(path)
    with atomic_path(path) as temp:
        temp.write_bytes(data)
    return path


def read_state(path: str | Path) -> bytes:
    """The bytes of a state file; a missing file is an InputError."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such state file; check the path") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory; pass a state file") from None
