from __future__ import annotations

import pytest
import torch

from compressor.data import load_texts, tokenize, windows
from compressor.errors import UsageError


def test_local_directory(data_dir):
    ds = load_texts(str(data_dir))
    assert set(ds.texts) == {"train", "validation", "test"} and not ds.notes


def test_missing_validation_falls_back_to_train(tmp_path, data_dir):
    (tmp_path / "d").mkdir()
    for split in ("train", "test"):
        (tmp_path / "d" / f"{split}.txt").write_text((data_dir / f"{split}.txt").read_text())
    ds = load_texts(str(tmp_path / "d"))
    assert ds.texts["validation"] and "validation" in ds.notes[0]


def test_wikitext2_from_env(monkeypatch, data_dir):
    monkeypatch.setenv("TAPC_DATA_DIR", str(data_dir))
    assert "TAPC_DATA_DIR" in load_texts("wikitext2").source


def test_wikitext2_offline_without_env_says_how_to_fix():
    with pytest.raises(UsageError, match="TAPC_DATA_DIR"):
        load_texts("wikitext2")


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "not found"),
    (lambda d: d.mkdir(), "no train.txt"),
    (lambda d: (d.mkdir(), (d / "train.txt").write_text(" \n"), (d / "test.txt").write_text("x")), "train text is empty"),
])
def test_bad_dataset_dirs(tmp_path, setup, message):
    folder = tmp_path / "ds"
    setup(folder)
    with pytest.raises(UsageError, match=message):
        load_texts(str(folder))


def test_tokenize_and_windows(tokenizer):
    ids = tokenize(tokenizer, "hello world " * 50)
    w = windows(ids, 8)
    assert w.shape == (ids.numel() // 8, 8) and torch.equal(w.flatten(), ids[: w.numel()])
