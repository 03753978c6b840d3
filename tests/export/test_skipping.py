"""Work skipping in the exported encoder step: the last layer computes only the rows that
are read ([CLS] and the memory for the step, the memory for the write variant), for BERT-
and RoBERTa-style bases; other families export the reference methods unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import transformers
from conftest import BERT_SPECIAL, make_encoder

from rmt_deploy.calibration.policies import POLICIES, applicable_policies, nodes_to_quantize
from rmt_deploy.contract import STEP, WRITE
from rmt_deploy.export.onnx_graph import export_graph, step_module, trace_inputs
from rmt_deploy.export.pipeline import ExportOptions, export_checkpoint
from rmt_deploy.model.base import StepVariant, build_encoder_base
from rmt_deploy.model.checkpoint import save_checkpoint
from rmt_deploy.model.encoder import SkippingStep, skipping_step
from rmt_deploy.model.factory import encoder_from_base
from rmt_deploy.segmentation import step_inputs

torch.set_num_threads(1)


def tiny(config_class, **extra) -> torch.nn.Module:
    torch.manual_seed(3)
    config = config_class(vocab_size=50, hidden_size=32, num_hidden_layers=3,
                          num_attention_heads=4, intermediate_size=64,
                          max_position_embeddings=40, num_labels=3, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, pad_token_id=0, **extra)
    return encoder_from_base(build_encoder_base(config), num_mem_tokens=3, input_size=16,
                             labels=("a", "b", "c"), special=BERT_SPECIAL).eval()


FAMILIES = {"bert": lambda: make_encoder(),
            "roberta": lambda: tiny(transformers.RobertaConfig),
            "xlm-roberta": lambda: tiny(transformers.XLMRobertaConfig)}


def batch(rmt, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Batch 3: a full segment, a short (padded) one and a one-token one."""
    config = rmt.rmt_config
    rng = np.random.default_rng(seed)
    segments = [rng.integers(5, 40, n) for n in (config.segment_size, 4, 1)]
    ids, mask = step_inputs(segments, config)
    memory = torch.randn(3, config.num_mem_tokens, config.hidden_size,
                         generator=torch.Generator().manual_seed(seed))
    return torch.from_numpy(ids), torch.from_numpy(mask), memory


@pytest.mark.parametrize("family", FAMILIES)
def test_skipping_step_computes_what_the_reference_computes(family):
    rmt = FAMILIES[family]()
    step, write = skipping_step(rmt, write=False), skipping_step(rmt, write=True)
    assert isinstance(step, SkippingStep) and isinstance(write, SkippingStep)
    with torch.no_grad():
        for seed in range(3):
            ids, mask, memory = batch(rmt, seed)
            logits, new_memory = rmt(ids, mask, memory)
            got_logits, got_memory = step(ids, mask, memory)
            torch.testing.assert_close(got_logits, logits, atol=1e-6, rtol=0)
            torch.testing.assert_close(got_memory, new_memory, atol=1e-6, rtol=0)
            torch.testing.assert_close(write(ids, mask, memory), rmt.write(ids, mask, memory),
                                       atol=1e-6, rtol=0)


def test_an_unrecognised_family_exports_the_reference_methods():
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2,
                                           hidden_dim=64, max_position_embeddings=32,
                                           num_labels=3, pad_token_id=0)
    base = transformers.AutoModelForSequenceClassification.from_config(
        config, attn_implementation="eager")
    rmt = encoder_from_base(base, num_mem_tokens=3, input_size=16, labels=("a", "b", "c"),
                            special=BERT_SPECIAL).eval()
    assert skipping_step(rmt, write=False) is None
    for graph, method in ((STEP, "forward"), (WRITE, "write")):
        module = step_module(rmt, graph)
        assert isinstance(module, StepVariant) and module.method == method


def matmul_rows(path) -> dict[str, int]:
    """Rows of the activation input of each weight product in a graph, by node name."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in (*model.graph.value_info, *model.graph.input)}
    weights = {t.name for t in model.graph.initializer}
    return {node.name: shapes[node.input[0]][-2] for node in model.graph.node
            if node.op_type in ("MatMul", "Gemm") and node.input[1] in weights
            and node.input[0] in shapes}


@pytest.mark.parametrize("graph", [STEP, WRITE])
def test_the_last_layer_of_the_graph_computes_only_the_rows_read(tmp_path, graph):
    rmt = make_encoder()
    config = rmt.rmt_config
    path = tmp_path / f"{graph}.onnx"
    export_graph(rmt, path, graph)
    rows = matmul_rows(path)
    last = {name: n for name, n in rows.items() if "/encoder/layer.1/" in name}
    first = {name: n for name, n in rows.items() if "/encoder/layer.0/" in name}
    assert set(first.values()) == {config.input_size}
    read = config.num_mem_tokens + (graph == STEP)
    keys_values = [n for name, n in last.items() if "/key/" in name or "/value/" in name]
    assert keys_values == [config.input_size] * 2  # keys and values from every position
    assert sorted(n for name, n in last.items() if "/key/" not in name
                  and "/value/" not in name) == [read] * 4  # query, output, FFN in and out
    if graph == WRITE:
        assert not any("pooler" in name or "classifier" in name for name in rows)


def test_int8_policies_still_find_the_layers(tmp_path):
    rmt = make_encoder()
    path = tmp_path / "model.onnx"
    export_graph(rmt, path, STEP)
    model = onnx.load(str(path))
    assert {p.name for p in applicable_policies(model)} == {"naive", "matmul", "linear"}
    matmul = next(p for p in POLICIES if p.name == "matmul")
    linear = next(p for p in POLICIES if p.name == "linear")
    assert len(nodes_to_quantize(model, matmul)) > len(nodes_to_quantize(model, linear))


def test_a_roberta_rmt_exports_and_validates(tmp_path):
    rmt = FAMILIES["roberta"]()
    checkpoint = save_checkpoint(rmt, tmp_path / "roberta.pt", None)
    manifest = export_checkpoint(checkpoint, tmp_path / "export",
                                 ExportOptions(validation_segments=4, threads=1))
    fp32 = manifest.validation["fp32"]
    for mode in ("open_loop", "closed_loop"):
        assert fp32[mode]["max_abs"]["write_memory_out"] <= 1e-4
        assert fp32[mode]["max_abs"]["logits"] <= 1e-4


def test_trace_inputs_are_what_the_graph_is_traced_with():
    rmt = make_encoder()
    ids, mask, memory = trace_inputs(rmt)
    with torch.no_grad():
        logits, new_memory = step_module(rmt, STEP)(ids, mask, memory)
        torch.testing.assert_close(logits, rmt(ids, mask, memory)[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(new_memory, rmt(ids, mask, memory)[1], atol=1e-6, rtol=0)
