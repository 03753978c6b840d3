"""A backend's state owns its buffers: running it never writes into the caller's array."""

import numpy as np

from rmt_deploy.manifest import read_manifest
from rmt_deploy.runtime.backends.onnxruntime import OnnxRuntimeEngine
from rmt_deploy.segmentation import step_inputs


def engines(manifest):
    yield OnnxRuntimeEngine(manifest)
    try:
        from rmt_deploy.runtime.backends.openvino import OpenVinoEngine
    except ImportError:
        return
    yield OpenVinoEngine(manifest, compute="fp32")


def test_new_state_copies_the_memory_it_is_given(encoder_export):
    manifest = read_manifest(encoder_export)
    config = manifest.config
    ids, mask = step_inputs([np.arange(5, 5 + config.segment_size)], config)
    for engine in engines(manifest):
        state_in = {k: v[None] for k, v in manifest.load_initial_state().items()}
        before = {k: v.copy() for k, v in state_in.items()}
        with engine.new_state(state_in) as state:
            for _ in range(3):
                state.step(ids, mask)
            for name, value in before.items():
                np.testing.assert_array_equal(state_in[name], value, err_msg=engine.name)
                assert not np.allclose(state.state()[name], value)


