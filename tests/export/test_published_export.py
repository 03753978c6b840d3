"""``rmt-export`` of a published plain RMT on Llama with peft LoRA: the merged model is
exported and validated through the decoder path, and the manifest says LoRA was merged."""

import torch
from click.testing import CliRunner
from conftest import write_gpt2_folder
from published_layouts import ALPHA, RANK, write_published

from rmt_deploy.cli import export_main
from rmt_deploy.manifest import read_manifest

torch.set_num_threads(1)


def test_export_merges_lora_and_records_it(tmp_path):
    published = write_published(tmp_path / "ckpt", armt=False, config={"segment_size": 6})
    base = write_gpt2_folder(tmp_path / "base", "llama")
    result = CliRunner().invoke(export_main, [
        str(published.path), "--base-model", str(base), "--lora-alpha", str(ALPHA),
        "--validation-segments", "3", "--threads", "1", "-q"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "ckpt" / "model-export")
    assert manifest.source["format"] == "authors-gpt2"
    assert manifest.source["lora"] == {"merged": True, "rank": RANK, "alpha": ALPHA,
                                       "modules": 4}
    assert manifest.config.segment_size == 6 and manifest.config.num_mem_tokens == 3
