"""A tokenizer file's own truncation (sentence-transformers ship 128) never drops text."""

from conftest import bert_tokenizer_json, make_encoder
from tokenizers import Tokenizer

from rmt_deploy.export.pipeline import ExportOptions, export_checkpoint
from rmt_deploy.model.checkpoint import save_checkpoint
from rmt_deploy.runtime import open_model


def test_truncating_tokenizers_are_made_plain(tmp_path_factory, tmp_path):
    truncating = Tokenizer.from_str(bert_tokenizer_json(tmp_path_factory))
    truncating.enable_truncation(max_length=8)
    truncating.enable_padding(length=8)
    checkpoint = save_checkpoint(make_encoder(), tmp_path / "e.pt", truncating.to_str())
    text = " ".join(f"w{i % 40 + 5}" for i in range(300))
    assert open_model(checkpoint).run_one(text).tokens == 300
    folder = export_checkpoint(checkpoint, tmp_path / "export",
                               ExportOptions(validation_segments=2)).folder
    saved = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert saved.truncation is None and saved.padding is None
    assert open_model(folder).run_one(text).tokens == 300
