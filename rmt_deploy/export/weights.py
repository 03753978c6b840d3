"""One weights file for every graph of an export (ONNX external data): each tensor is
written once, and graphs that hold the same tensor (the variants of one model, all
exported from the same weights) refer to the same bytes under the same name. So the
export is about the size of the weights, has no 2 GB protobuf limit, and a runtime can
map the file once for all its sessions."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

WEIGHTS_FILE = "weights.data"
MIN_BYTES = 1024  # smaller tensors stay inside their graph
ALIGN = 4096  # tensors start on page boundaries, so the file can be memory-mapped


class WeightStore:
    """Writes ``folder/weights.data`` as graphs are added; :meth:`record` describes it
    for the manifest."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / WEIGHTS_FILE
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self._by_content: dict[str, str] = {}  # content key -> tensor name
        self.tensors: dict[str, dict[str, Any]] = {}  # name -> offset, bytes, dtype, shape

    def add_graph(self, source: Path, target: Path) -> None:
        """Move the tensors of the ONNX graph ``source`` (with its own external data, if
        any) into the store and save the graph, referring to them, as ``target``."""
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(source))
        renamed: dict[str, str] = {}
        kept = []  # small tensors, left in the graph under their names
        for tensor in model.graph.initializer:
            array = numpy_helper.to_array(tensor)
            if array.nbytes < MIN_BYTES:
                kept.append(tensor)
                continue
            name = self._store(tensor.name, np.ascontiguousarray(array))
            if name != tensor.name:
                renamed[tensor.name] = name
            entry = self.tensors[name]
            tensor.name = name
            tensor.ClearField("raw_data")
            for field in ("float_data", "int32_data", "int64_data", "double_data"):
                tensor.ClearField(field)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", WEIGHTS_FILE), ("offset", entry["offset"]),
                               ("length", entry["bytes"])):
                item = tensor.external_data.add()
                item.key, item.value = key, str(value)
        stored = set(renamed.values())
        for tensor in kept:  # a stored tensor took this name: the small one gives way
            if tensor.name in stored:
                name = tensor.name
                while name in stored or name in self.tensors:
                    name += "_"
                renamed[tensor.name], tensor.name = name, name
        for node in model.graph.node:
            node.input[:] = [renamed.get(name, name) for name in node.input]
        self._file.flush()  # graphs are loaded from the file while it grows
        onnx.save(model, str(target))

    def _store(self, name: str, array: np.ndarray) -> str:
        """The name the tensor is stored under: an earlier tensor of equal content, or
        ``name`` (made unique) with the bytes appended."""
        data = array.tobytes()
        key = f"{array.dtype}{array.shape}{hashlib.sha256(data).hexdigest()}"
        if key in self._by_content:
            return self._by_content[key]
        while name in self.tensors:
            name += "_"
        offset = self._file.tell()
        padding = -offset % ALIGN
        self._file.write(b"\0" * padding)
        self._file.write(data)
        self.tensors[name] = {"offset": offset + padding, "bytes": len(data),
                              "dtype": array.dtype.name, "shape": list(array.shape)}
        self._by_content[key] = name
        return name

    @property
    def reference(self) -> tuple[dict[str, str], ...]:
        """A graph's ``data`` entry while the file grows (its sha256 comes with
        :meth:`record`)."""
        return ({"file": WEIGHTS_FILE, "sha256": ""},)

    def index(self) -> dict[str, Any]:
        """The weights index so far (file flushed, not hashed): lets validation's sessions
        map the file once and share it, as a finished export's do."""
        self._file.flush()
        return {"file": WEIGHTS_FILE, "tensors": dict(self.tensors)}

    def close(self) -> None:
        self._file.close()

    def record(self) -> dict[str, Any]:
        """The manifest's ``weights`` entry: file, sha256 and where each tensor lies."""
        from rmt_deploy.files import sha256_file

        self.close()
        return {"file": WEIGHTS_FILE, "sha256": sha256_file(self.path),
                "tensors": self.tensors}
