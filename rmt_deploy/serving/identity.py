"""What identifies a model across server and client: the export's one identity
(``Manifest.identity``, the sha256 of its rmt.json), the same the runtime checks
saved sessions against. A saved sequence state is only valid for the model it came
from."""

from __future__ import annotations

from rmt_deploy.manifest import Manifest

#: Name of the config.pbtxt parameter that carries the identity to clients.
MODEL_ID_PARAMETER = "rmt_model_id"


def model_identity(manifest: Manifest) -> str:
    """The identity of the export ``manifest`` was read from, as it was read."""
    return manifest.identity()
