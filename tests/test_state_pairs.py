"""The recurrent state is data: a toy model that carries one more state pair (a running
count of the steps a row took, int64, beside its FP32 memory) exports, runs on ONNX
Runtime and OpenVINO, and saves and restores in a session, with no edit outside the
contract's declaration (``contract.STATE``) and the toy model itself."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rmt_deploy import contract
from rmt_deploy.contract import BATCH, StatePair, rmt_memory, variants
from rmt_deploy.export.onnx_graph import export_graph
from rmt_deploy.manifest import Manifest, graph_spec, initial_state_records, write_manifest
from rmt_deploy.runtime import open_model
from rmt_deploy.runtime.backends.torch import TorchEngine
from rmt_deploy.runtime.model import RMTModel
from rmt_deploy.runtime.state import unpack
from rmt_deploy.spec import DECODER, RMTConfig

COUNT = StatePair("count_in", "count_out", "int64", (BATCH, 1))  # starts at zero


class CountingRMT(torch.nn.Module):
    """A tiny decoder step: logits from the tokens and the memory; the memory decays
    towards the segment's mean embedding; the count goes up by one a step."""

    def __init__(self, config: RMTConfig) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rmt_config = config
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.head = torch.nn.Linear(config.hidden_size, config.vocab_size)
        self.memory = torch.nn.Parameter(torch.randn(config.num_mem_tokens, config.hidden_size))

    def initial_state(self, batch: int) -> dict[str, torch.Tensor]:
        return {"memory_in": self.memory.expand(batch, -1, -1)}

    def forward(self, input_ids, attention_mask, memory, count):
        hidden = self.embed(input_ids) * attention_mask[..., None]
        logits = self.head(hidden + memory.mean(1, keepdim=True))
        return (logits, *self.write(input_ids, attention_mask, memory, count))

    def write(self, input_ids, attention_mask, memory, count):
        hidden = self.embed(input_ids) * attention_mask[..., None]
        mean = hidden.sum(1, keepdim=True) / attention_mask.sum(1)[:, None, None]
        return 0.5 * memory + mean, count + 1


@pytest.fixture
def toy(monkeypatch, tmp_path) -> tuple[Path, CountingRMT]:
    """The declaration (one more pair for decoders) and the toy exported with it."""
    monkeypatch.setitem(contract.STATE, DECODER, lambda config: (*rmt_memory(config), COUNT))
    config = RMTConfig.decoder(num_mem_tokens=2, hidden_size=8, vocab_size=30,
                               segment_size=5, pad_token_id=0)
    rmt = CountingRMT(config).eval()
    folder = tmp_path / "toy"
    folder.mkdir()
    graphs = {}
    for name, declared in variants(config).items():
        export_graph(rmt, folder / declared.file, name)
        graphs[name] = graph_spec(config, name, folder / declared.file)
    initial = TorchEngine(rmt).initial_state()
    write_manifest(Manifest(config, graphs, initial_state_records(config, initial, folder),
                            None, {}, {}), folder)
    return folder, rmt


def saved_count(data: bytes) -> np.ndarray:
    return unpack(data)[1]["state/count_in"]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_declared_state_pair_exports_runs_and_saves(toy, backend):
    if backend == "openvino":
        pytest.importorskip("openvino", reason="openvino is not installed")
    folder, rmt = toy
    model = open_model(folder, backend=backend, threads=1)
    assert sorted(model.initial_state) == ["count_in", "memory_in"]
    assert model.initial_state["count_in"].dtype == np.int64
    reference = RMTModel(TorchEngine(rmt), TorchEngine(rmt).initial_state())
    ids = np.arange(1, 13)  # three segments: 5, 5 and 2 tokens
    expected = reference.run_one(ids)
    got = model.run_one(ids)
    np.testing.assert_allclose(got.memory, expected.memory, atol=1e-2)
    assert got.perplexity == pytest.approx(expected.perplexity, rel=1e-2)

    session = model.session()
    session.feed(ids[:7])  # one full segment run, two tokens waiting
    data = session.save()
    np.testing.assert_array_equal(saved_count(data), [[1]])
    restored = model.restore_session(data)
    restored.feed(ids[7:])
    np.testing.assert_array_equal(saved_count(restored.save()), [[2]])
    result = restored.close()
    np.testing.assert_allclose(result.memory, got.memory, atol=1e-5)
    assert result.perplexity == pytest.approx(got.perplexity, rel=1e-5)


def test_shapes_are_derived_in_the_contract_only():
    """No module outside the contract and the reference model builds the memory's or the
    cache's shape from the config."""
    package = Path(__file__).resolve().parents[1] / "rmt_deploy"
    pattern = re.compile(r"num_mem_tokens\s*,\s*\S*hidden_size|cache_heads|head_dim")
    found = [f"{path.relative_to(package)}:{number}"
             for path in sorted(package.rglob("*.py"))
             if path.name != "contract.py" and "model" not in path.relative_to(package).parts
             and path.name != "spec.py"
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if pattern.search(line)]
    assert found == []
