from __future__ import annotations

import pytest
import torch

from compressor.calibration import recipe_calibration
from compressor.data import load_texts, tokenize, windows
from compressor.errors import UsageError
from compressor.recipe import load_recipe


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


def test_calibration_windows_are_training_windows_or_cut_from_the_text_at_their_own_length():
    text = torch.arange(1000)
    train = windows(text, 16)[torch.randperm(62)]  # as self-distillation leaves them: not in text order
    default = recipe_calibration(train, load_recipe("quick-cpu", {"seed": 3}), text)
    assert default.shape == (32, 16) and all(any(torch.equal(w, t) for t in train) for w in default)
    longer = recipe_calibration(train, load_recipe("quick-cpu", {"seed": 3, "prune.calibration_len": 100}), text)
    starts = longer[:, 0].tolist()
    assert longer.shape == (10, 100) and starts == sorted(starts)  # all 10 windows of the text, in order
    assert torch.equal(longer, windows(text, 100))
    picked = recipe_calibration(train, load_recipe("quick-cpu", {"seed": 3, "prune.calibration_len": 20}), text)
    assert picked.shape == (32, 20) and all(int(w[0]) % 20 == 0 and torch.equal(w, w[0] + torch.arange(20))
                                            for w in picked)  # whole windows of the text, 32 of its 50
    again = recipe_calibration(train, load_recipe("quick-cpu", {"seed": 3, "prune.calibration_len": 20}), text)
    other = recipe_calibration(train, load_recipe("quick-cpu", {"seed": 4, "prune.calibration_len": 20}), text)
    assert torch.equal(picked, again) and not torch.equal(picked, other)  # drawn by the seed
    with pytest.raises(UsageError, match="calibration_len is 2000 tokens, but the training text has only 1000"):
        recipe_calibration(train, load_recipe("quick-cpu", {"prune.calibration_len": 2000}), text)
