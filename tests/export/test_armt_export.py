"""The ARMT exported, validated open and closed loop, and run: perplexity and greedy ids
on ONNX Runtime and OpenVINO equal the reference's; sessions save and restore every
state pair."""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from armt_models import make_armt  # noqa: E402
from conftest import write_gpt2_folder  # noqa: E402

from rmt_deploy.contract import DECODE, PREFILL, STEP, WRITE, state_pairs, variant  # noqa: E402
from rmt_deploy.errors import InputError  # noqa: E402
from rmt_deploy.export.pipeline import export_checkpoint  # noqa: E402
from rmt_deploy.manifest import read_manifest  # noqa: E402
from rmt_deploy.model.armt import generate_armt  # noqa: E402
from rmt_deploy.model.checkpoint import save_checkpoint  # noqa: E402
from rmt_deploy.runtime import open_model  # noqa: E402
from rmt_deploy.runtime.backends.torch import TorchEngine  # noqa: E402
from rmt_deploy.runtime.model import RMTModel  # noqa: E402
from rmt_deploy.spec import RMTConfig  # noqa: E402

DOC = np.array([(7 * i + 3) % 52 for i in range(20)])  # 4 segments of 6, the last short


@pytest.fixture(scope="module")
def armt_export(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    root = tmp_path_factory.mktemp("armt")
    tokenizer = (write_gpt2_folder(root / "base", "llama") / "tokenizer.json").read_text()
    rmt = make_armt()
    checkpoint = save_checkpoint(rmt, root / "armt.pt", tokenizer)
    return export_checkpoint(checkpoint, root / "export").folder, rmt


def test_every_state_pair_is_float32_in_every_graph(armt_export):
    folder, rmt = armt_export
    manifest = read_manifest(folder)
    config = manifest.config
    assert config.is_armt and RMTConfig.from_dict(config.to_dict()) == config
    assert set(manifest.graphs) == {STEP, WRITE, PREFILL, DECODE}
    names = [pair.name_in for pair in state_pairs(config)]
    assert names == ["A.0", "z.0", "A.1", "z.1", "started"]
    assert names == [p.name_in for p in variant(config, DECODE).reads][: len(names)]
    for graph in manifest.graphs.values():
        model = onnx.load(str(folder / graph.file), load_external_data=False)
        typed = {v.name: v.type.tensor_type.elem_type
                 for v in (*model.graph.input, *model.graph.output)}
        state = [name for name in typed if name[:2] in ("A.", "z.", "A_", "z_")]
        assert state and all(typed[name] == onnx.TensorProto.FLOAT for name in state)


def test_the_lm_head_is_one_gemm_over_the_weight_as_stored(armt_export):
    """Gemm(hidden, weight, transB=1): ONNX Runtime packs the weight once (a decode
    token's head ~3x faster than MatMul(weight, hidden^T)) and no transposed copy of it
    is stored."""
    folder, rmt = armt_export
    manifest = read_manifest(folder)
    vocab, width = rmt.model.get_output_embeddings().weight.shape
    for name in (STEP, PREFILL, DECODE):
        model = onnx.load(str(folder / manifest.graphs[name].file), load_external_data=False)
        shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
        heads = [node for node in model.graph.node if node.op_type == "Gemm"]
        assert len(heads) == 1, name
        assert shapes[heads[0].input[1]] == (vocab, width)
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in heads[0].attribute}
        assert attributes.get("transB") == 1
        assert (width, vocab) not in shapes.values()


def test_validated_open_and_closed_loop_and_generation(armt_export):
    results = read_manifest(armt_export[0]).validation["fp32"]
    for loop in ("open_loop", "closed_loop"):
        assert results[loop]["agreement"] == 1.0
        assert results[loop]["min_memory_cosine"] > 0.999  # unwritten keys count as equal
    assert results["generation"]["generated_same"] == 1.0


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_perplexity_and_greedy_ids_equal_the_reference(armt_export, backend):
    if backend == "openvino":
        pytest.importorskip("openvino", reason="openvino is not installed")
    folder, rmt = armt_export
    model = open_model(folder, backend=backend, threads=1)
    reference = RMTModel(TorchEngine(rmt), TorchEngine(rmt).initial_state())
    got, expected = model.run_one(DOC), reference.run_one(DOC)
    assert got.perplexity == pytest.approx(expected.perplexity, rel=1e-5)
    generated = model.run_one(DOC, generate=8).generated_ids
    assert generated == generate_armt(rmt, DOC, 8)
    assert generated == reference.run_one(DOC, generate=8).generated_ids


def test_a_session_saves_and_restores_every_pair(armt_export):
    folder, _ = armt_export
    model = open_model(folder, backend="onnxruntime", threads=1)
    whole = model.run_one(DOC)
    session = model.session()
    session.feed(DOC[:9])
    data = session.save()
    restored = model.restore_session(data)
    restored.feed(DOC[9:])
    result = restored.close()
    assert result.perplexity == pytest.approx(whole.perplexity, rel=1e-5)
    np.testing.assert_allclose(result.memory, whole.memory, atol=1e-5)


def test_restore_checks_every_pair_shape(armt_export):
    from rmt_deploy.runtime.state import pack, unpack

    model = open_model(armt_export[0], backend="onnxruntime", threads=1)
    session = model.session()
    session.feed(DOC[:9])
    header, arrays = unpack(session.save())
    arrays["state/z.1"] = arrays["state/z.1"][..., :-1]
    with pytest.raises(InputError, match="state z.1 is float32"):
        model.restore_session(pack(header, arrays))


def test_the_session_pool_batches_rows_at_different_segments(armt_export):
    """Two streams stepped together, one on its first segment and one on a later one:
    each row keeps its own ``started`` and gets what it gets alone."""
    import threading

    from rmt_deploy.runtime.pool import SessionPool

    model = open_model(armt_export[0], backend="onnxruntime", threads=1)
    docs = [DOC, DOC[::-1].copy()]
    alone = [model.run_one(doc).perplexity for doc in docs]
    with SessionPool(model) as pool:
        ids = [pool.open(), pool.open()]
        pool.feed(ids[0], DOC[:6])
        threads = [threading.Thread(target=pool.feed, args=(ids[0], DOC[6:])),
                   threading.Thread(target=pool.feed, args=(ids[1], docs[1]))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        got = [pool.close(i).perplexity for i in ids]
    assert got == pytest.approx(alone, rel=1e-5)


def test_rows_of_one_exported_step_keep_their_own_first_segment_mark(armt_export):
    folder, rmt = armt_export
    engine = open_model(folder, backend="onnxruntime", threads=1).engine
    reference = TorchEngine(rmt)
    later = reference.new_state({name: value[None]
                                 for name, value in reference.initial_state().items()})
    ids = DOC[None, :6].astype(np.int64)
    later.step(ids, np.ones_like(ids), logits=False)
    state = later.state()
    assert state["A.0"].shape == (1, 24, 32) and state["started"].tolist() == [[1.0]]
    first = {**state, "started": np.zeros_like(state["started"])}
    both = {name: np.concatenate([first[name], state[name]]) for name in state}
    ids = np.repeat(DOC[None, 6:12].astype(np.int64), 2, axis=0)
    got = engine.new_state(both).step(ids, np.ones_like(ids))
    expected = reference.new_state(both).step(ids, np.ones_like(ids))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert not np.allclose(got[0], got[1], atol=1e-3)


def test_a_large_running_state_is_judged_relative_to_its_size(tmp_path):
    """W_mk 30 times larger: A and z grow 900 times (thousands after a few segments)
    while the outputs stay as they were; float32 rounding of such sums exceeds the
    absolute 1e-4, so the export judges them relative to their largest value."""
    rmt = make_armt()
    with torch.no_grad():
        for maps in rmt.maps:
            maps.W_mk.weight.mul_(30.0)
    manifest = export_checkpoint(save_checkpoint(rmt, tmp_path / "armt.pt", None),
                                 tmp_path / "export")
    closed = manifest.validation["fp32"]["closed_loop"]["max_abs"]
    assert max(closed[f"z_out.{i}"] for i in range(2)) > 1e-4  # above the absolute gate
    assert closed["logits"] < 1e-4
