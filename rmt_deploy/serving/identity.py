"""What identifies a model across server and client: the step graph and the initial
state, as hashed in the manifest. A saved sequence state is only valid for
the model it came from."""

from __future__ import annotations

import hashlib

from rmt_deploy.contract import STEP
from rmt_deploy.manifest import Manifest

#: Name of the config.pbtxt parameter that carries the identity to clients.
MODEL_ID_PARAMETER = "rmt_model_id"


def model_identity(manifest: Manifest) -> str:
    """A short hex digest of the step graph and the initial state of an export."""
    digest = hashlib.sha256()
    digest.update(manifest.graphs[STEP].sha256.encode())
    for name in sorted(manifest.initial_state):
        digest.update(manifest.initial_state[name]["sha256"].encode())
    return digest.hexdigest()[:32]
