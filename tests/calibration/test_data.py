"""Calibration corpora: read from text or token ids, checked against the model."""

import io
import zipfile

import numpy as np
import pytest

from rmt_deploy.calibration.data import read_corpus
from rmt_deploy.errors import InputError
from rmt_deploy.manifest import read_manifest
from rmt_deploy.runtime.tokens import manifest_tokenizer


@pytest.fixture(scope="module")
def model(encoder_export):
    manifest = read_manifest(encoder_export)
    return manifest.config, manifest_tokenizer(manifest)


def words(rng, n):
    return " ".join(f"w{i}" for i in rng.integers(5, 45, n))


def test_text_folder_gives_one_document_per_file_and_a_content_hash(model, tmp_path):
    config, tokenizer = model
    rng = np.random.default_rng(0)
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(words(rng, 40 * config.segment_size))
    (tmp_path / "notes.md").write_text("ignored: not .txt")
    with read_corpus(tmp_path, config, tokenizer) as corpus:
        assert len(corpus.documents) == 3
        assert corpus.tokens == 3 * 40 * config.segment_size
        assert corpus.describe(config)["segments"] == 120
    with read_corpus(tmp_path, config, tokenizer) as again:
        assert again.sha256 == corpus.sha256
    (tmp_path / "doc1.txt").write_text(words(rng, 40 * config.segment_size))
    with read_corpus(tmp_path, config, tokenizer) as changed:
        assert changed.sha256 != corpus.sha256


def test_token_ids_in_npy_and_npz(model, tmp_path):
    config, _ = model
    rng = np.random.default_rng(1)
    np.save(tmp_path / "rows.npy", rng.integers(5, 45, (4, 10 * config.segment_size)))
    np.savez(tmp_path / "more.npz", a=rng.integers(5, 45, 20 * config.segment_size))
    corpus = read_corpus(tmp_path, config, None)
    assert sorted(len(d) for d in corpus.documents) == [10 * config.segment_size] * 4 + [
        20 * config.segment_size]


@pytest.mark.parametrize("amount, needed", [((1, 100), "at least 2 documents"),
                                            ((3, 2), "32 segments")])
def test_too_little_data_is_an_error(model, tmp_path, amount, needed):
    config, _ = model
    documents, segments = amount
    np.save(tmp_path / "ids.npy",
            np.random.default_rng(2).integers(5, 45, (documents, segments * config.segment_size)))
    with pytest.raises(InputError, match=needed):
        read_corpus(tmp_path / "ids.npy", config, None)


def test_text_in_another_tokenizer_is_an_error(model, tmp_path):
    config, tokenizer = model
    (tmp_path / "a.txt").write_text("bonjour tout le monde " * 500)
    with pytest.raises(InputError, match="unknown to the model's tokenizer"):
        read_corpus(tmp_path, config, tokenizer)


@pytest.mark.parametrize("array, message", [
    (np.full((2, 500), 999), r"must lie in \[0, 53\)"),
    (np.zeros((2, 3, 400), dtype=np.int64), "shaped"),
    (np.ones((2, 500)) * 7.0, "dtype float64"),
])
def test_ids_of_the_wrong_tokenizer_or_shape_are_errors(model, tmp_path, array, message):
    config, _ = model
    np.save(tmp_path / "ids.npy", array)
    with pytest.raises(InputError, match=message):
        read_corpus(tmp_path / "ids.npy", config, None)


def test_unreadable_or_missing_inputs_are_errors(model, tmp_path):
    config, tokenizer = model
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(InputError, match="not a readable numpy file"):
        read_corpus(tmp_path / "bad.npy", config, None)
    with pytest.raises(InputError, match="no such calibration"):
        read_corpus(tmp_path / "missing", config, tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no .txt"):
        read_corpus(tmp_path / "empty", config, tokenizer)
    (tmp_path / "t.txt").write_text("w1 w2")
    with pytest.raises(InputError, match="no tokenizer"):
        read_corpus(tmp_path / "t.txt", config, None)


def test_the_corpus_spools_its_text_files_into_one_file_closed_with_it(model, tmp_path,
                                                                       monkeypatch):
    import os
    import tempfile

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("counts open files in /proc")
    config, tokenizer = model
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    before = len(os.listdir("/proc/self/fd"))
    rng = np.random.default_rng(4)
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(words(rng, 20 * config.segment_size))
    with read_corpus(tmp_path, config, tokenizer) as corpus:  # one descriptor for 3 files
        assert len(os.listdir("/proc/self/fd")) == before + 1 and corpus.tokens > 0
        assert list(spool.iterdir()) == []  # the spooled ids are in files without names
    assert len(os.listdir("/proc/self/fd")) == before
    (tmp_path / "doc9.txt").write_text("w5 w6")  # still too little: refused, nothing left
    with pytest.raises(InputError):
        read_corpus(tmp_path, config, tokenizer, min_segments=10**6)
    assert len(os.listdir("/proc/self/fd")) == before and list(spool.iterdir()) == []


def _lying_npy(values: int) -> bytes:
    """128 bytes whose .npy header claims ``values`` int64 values."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<i8", "fortran_order": False, "shape": (values,)})
    return header.getvalue().ljust(128, b"\0")


def test_a_npy_header_claiming_more_than_the_file_holds_is_refused_unread(model, tmp_path):
    config, _ = model
    (tmp_path / "lie.npy").write_bytes(_lying_npy(10**12))
    with pytest.raises(InputError, match=r"declares shape \(1000000000000,\) .* but 0 bytes"):
        read_corpus(tmp_path / "lie.npy", config, None)
    with zipfile.ZipFile(tmp_path / "lie.npz", "w") as archive:
        archive.writestr("ids.npy", _lying_npy(10**12))
    with pytest.raises(InputError, match=r"lie.npz:ids.npy: its header declares"):
        read_corpus(tmp_path / "lie.npz", config, None)
