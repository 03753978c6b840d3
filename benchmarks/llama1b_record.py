"""The once-only record of a full Llama-3.2-1B-shape ARMT (docs/benchmarks.md, "Llama-3.2-1B
shape"): random weights in the published layout (peft LoRA r=8 alpha 32 on q/v, ARMT layers
under ``memory_cell.layers.N``, tied embeddings, 16 memory tokens, d_mem 64, segment 1024),
written under a scratch folder (~5 GB, never in the repository); then ``rmt-export`` (FP32,
no correction) and ``rmt-run --generate 16`` on a ~4-segment input, with peak RSS of each.

    python benchmarks/llama1b_record.py [--work /tmp/llama1b] [--threads 2]

Prints the figures as one JSON object."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from machine import cpu_description, load, peak_rss_mb  # noqa: E402

LAYERS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 16, 2048, 8192, 32, 8, 128256
RANK, ALPHA, MEM_TOKENS, D_MEM, SEGMENT = 8, 32.0, 16, 64, 1024
PEFT = "memory_cell.model.base_model.model."


def llama_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128001, pad_token_id=None)


def write_base(folder: Path) -> Path:
    """The --base-model folder: the 1B config and the tests' small byte-level tokenizer
    (its ids are a subset of the vocabulary: enough to feed the model)."""
    from conftest import write_gpt2_folder
    write_gpt2_folder(folder, "llama")
    llama_config().save_pretrained(folder)
    return folder


def write_checkpoint(folder: Path) -> tuple[Path, int]:
    """The published-layout safetensors (one tensor per name, embeddings stored once as
    the hub's save_model keeps tied weights); returns it and the base's parameter count."""
    generator = torch.Generator().manual_seed(0)
    kv = HIDDEN // HEADS * KV_HEADS

    def rand(*shape, scale=0.02):
        return torch.randn(*shape, generator=generator) * scale

    state = {f"{PEFT}model.embed_tokens.weight": rand(VOCAB, HIDDEN),
             f"{PEFT}model.norm.weight": torch.ones(HIDDEN),
             "memory_cell.memory": rand(MEM_TOKENS, HIDDEN, scale=1.0)}
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (kv, HIDDEN),
              "self_attn.v_proj": (kv, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
              "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
              "mlp.down_proj": (HIDDEN, INTERMEDIATE)}
    for index in range(LAYERS):
        layer = f"memory_cell.layers.{index}."
        for module, (out, inp) in shapes.items():
            if module.endswith(("q_proj", "v_proj")):
                state[f"{layer}layer.{module}.base_layer.weight"] = rand(out, inp)
                state[f"{layer}layer.{module}.lora_A.default.weight"] = rand(RANK, inp)
                state[f"{layer}layer.{module}.lora_B.default.weight"] = rand(out, RANK)
            else:
                state[f"{layer}layer.{module}.weight"] = rand(out, inp)
        state[f"{layer}layer.input_layernorm.weight"] = torch.ones(HIDDEN)
        state[f"{layer}layer.post_attention_layernorm.weight"] = torch.ones(HIDDEN)
        scale = HIDDEN ** -0.5
        state[f"{layer}W_mq.weight"] = rand(D_MEM, HIDDEN, scale=scale)
        state[f"{layer}W_mk.weight"] = rand(D_MEM, HIDDEN, scale=scale)
        state[f"{layer}W_mv.weight"] = rand(HIDDEN, HIDDEN, scale=scale)
        state[f"{layer}W_mb.weight"] = rand(1, HIDDEN, scale=scale)
        state[f"{layer}W_mb.bias"] = rand(1, scale=1.0)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    base_params = sum(v.numel() for k, v in state.items()
                      if "lora_" not in k and "W_m" not in k and k != "memory_cell.memory")
    return path, base_params


def timed(command: list[str]) -> tuple[float, float]:
    """Seconds and peak RSS (MB) of ``command``."""
    started = time.perf_counter()
    rss = peak_rss_mb(command)
    return time.perf_counter() - started, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/llama1b"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    work, bin_dir = args.work, Path(sys.executable).parent
    result = {"machine": cpu_description(), "load_start": load()}
    started = time.perf_counter()
    checkpoint, base_params = write_checkpoint(work / "ckpt")
    base = write_base(work / "base")
    result["write_s"] = round(time.perf_counter() - started, 1)
    result["checkpoint_gb"] = round(checkpoint.stat().st_size / 1e9, 3)
    weights = base_params * 4
    out = work / "export"
    export_s, export_rss = timed([
        str(bin_dir / "rmt-export"), str(checkpoint), "--base-model", str(base),
        "--lora-alpha", str(ALPHA), "--no-armt-correction", "--segment-size", str(SEGMENT),
        "--validation-segments", "2",
        "--threads", str(args.threads), "-q", "-o", str(out)])
    result.update(export_s=round(export_s, 1), export_peak_rss_gb=round(export_rss / 1024, 2),
                  load_after_export=load())
    files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    result["export_files"] = {name: round(size / 1e9, 3) for name, size in files.items()}
    result["graphs"] = sorted(name for name in files if name.endswith(".onnx"))
    result["weights_gb"] = round(weights / 1e9, 3)
    result["export_size_ratio"] = round(sum(files.values()) / weights, 3)
    text = work / "input.txt"
    text.write_text(" ".join("abcdefghij"[i % 10] * (1 + i % 3) for i in range(1300)))
    run = [str(bin_dir / "rmt-run"), str(out), str(text), "--backend", "onnxruntime",
           "--threads", str(args.threads), "--json"]
    prefill_s, prefill_rss = timed(run)
    generate_s, generate_rss = timed(run + ["--generate", "16"])
    from tokenizers import Tokenizer
    tokens = len(Tokenizer.from_file(str(base / "tokenizer.json")).encode(text.read_text()).ids)
    result.update(input_tokens=tokens, segments=-(-tokens // SEGMENT),
                  run_s=round(prefill_s, 1), run_peak_rss_gb=round(prefill_rss / 1024, 2),
                  generate_s=round(generate_s, 1),
                  generate_peak_rss_gb=round(generate_rss / 1024, 2),
                  rss_ratio=round(generate_rss * 2**20 / weights, 3),
                  run_s_per_segment=round(prefill_s / -(-tokens // SEGMENT), 1),
                  load_end=load())
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
