"""The `tapc` command end to end through CliRunner, on tiny local models and text."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from compressor import __version__

from .test_plots import assert_sensible_png

from .conftest import run_cli as run


def test_version_and_help():
    result = run("--version")
    assert result.exit_code == 0 and __version__ in result.output
    for command in ([], ["compress"], ["compare"]):
        result = run(*command, "--help")
        assert result.exit_code == 0 and "Usage" in result.output


def test_compress_end_to_end(model_dir, data_dir, quick_recipe_file, tmp_path):
    out = tmp_path / "out"
    result = run("compress", model_dir, "--recipe", quick_recipe_file, "--dataset", data_dir,
                 "--out", out, "--sparsity", 0.4, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["recipe"]["prune"]["sparsity"] == 0.4
    assert sorted(p.name for p in out.iterdir()) == [
        "layers.png", "model", "recipe.yaml", "report.json", "report.md", "sparse", "training.png",
        "training_log.json"]
    assert json.loads((out / "report.json").read_text())["sparsity"] == report["sparsity"]
    assert report["files"] == {"report": "report.md", "plots": {"training": "training.png", "layers": "layers.png"},
                               "plots_skipped": []}
    for name in ("training.png", "layers.png"):
        assert_sensible_png(out / name)
    page = (out / "report.md").read_text(encoding="utf-8")
    assert "](training.png)" in page and "](layers.png)" in page
    assert f"{report['perplexity']['pruned']['ppl']:.3f} pruned" in page
    # Zeros counted independently in the saved safetensors agree with the report.
    tensors = load_file(out / "model" / "model.safetensors")
    zeros = {layer["name"]: int((tensors[layer["name"]] == 0).sum()) for layer in report["sparsity"]["layers"]}
    assert zeros == {layer["name"]: layer["zeros"] for layer in report["sparsity"]["layers"]}
    total = report["sparsity"]["prunable_params"]
    assert abs(sum(zeros.values()) - round(0.4 * total)) <= 1
    assert report["perplexity"]["dense"]["tokens"] == report["perplexity"]["pruned"]["tokens"] > 0


def test_compress_table_output(gpt2_dir, data_dir, quick_recipe_file, tmp_path):
    result = run("compress", gpt2_dir, "--recipe", quick_recipe_file, "--dataset", data_dir,
                 "--out", tmp_path / "o", "--steps", 4)
    assert result.exit_code == 0, result.output
    assert "transformer.h.0.attn.c_attn.weight" in result.stdout
    assert "global sparsity" in result.stdout and "perplexity" in result.stdout
    assert "report.md, training.png, layers.png" in result.stdout


def test_compress_without_matplotlib_succeeds_and_says_so(gpt2_dir, data_dir, quick_recipe_file, tmp_path,
                                                          monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    out = tmp_path / "out"
    result = run("compress", gpt2_dir, "--recipe", quick_recipe_file, "--dataset", data_dir, "--out", out,
                 "--steps", 2, "--json")
    assert result.exit_code == 0, result.output
    said = [line for line in result.stderr.splitlines() if "plots skipped" in line]
    assert said == ["warning: plots skipped: matplotlib is not installed (pip install 'tapc[plots]')"]
    assert not (out / "training.png").exists() and not (out / "layers.png").exists()
    assert json.loads(result.stdout)["files"]["plots"] == {}
    assert "plots skipped" in (out / "report.md").read_text(encoding="utf-8")


def _tiny_text_dir(tmp_path):
    folder = tmp_path / "short"
    folder.mkdir()
    for split in ("train", "validation", "test"):
        (folder / f"{split}.txt").write_text("a few words only\n")
    return folder


BAD_INPUTS = {
    "sparsity out of range": (["--sparsity", "1.5"], "1.5"),
    "sparsity not a number": (["--sparsity", "lots"], "lots"),
    "negative sparsity": (["--sparsity", "-0.1"], "-0.1"),
    "unknown recipe": (["--recipe", "nope"], "recipe 'nope' not found"),
    "missing dataset": (["--dataset", "./no-such-dir"], "dataset './no-such-dir' not found"),
    "sequence beyond context": (["--seq-len", "4096"], "exceeds the model's context of 128"),
    "unknown device": (["--device", "tpu9"], "unknown device"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_options_exit_2_and_write_nothing(case, gpt2_dir, data_dir, quick_recipe_file, tmp_path):
    args, message = BAD_INPUTS[case]
    base = ["compress", gpt2_dir, "--dataset", data_dir, "--recipe", quick_recipe_file, "--out", tmp_path / "out"]
    result = run(*base, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len([line for line in result.stderr.strip().splitlines() if line.startswith("Error")]) == 1
    assert not (tmp_path / "out").exists()


def test_bad_model_inputs(tmp_path, data_dir):
    for model, message in [("./missing-model", "does not exist"), ("gpt2", "Hugging Face Hub"),
                           ("missing.gguf", "does not exist")]:
        result = run("compress", model, "--dataset", data_dir, "--out", tmp_path / "out")
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert not (tmp_path / "out").exists()


def test_dataset_shorter_than_one_window(gpt2_dir, quick_recipe_file, tmp_path):
    result = run("compress", gpt2_dir, "--recipe", quick_recipe_file, "--dataset", _tiny_text_dir(tmp_path),
                 "--out", tmp_path / "out")
    assert result.exit_code == 2 and "less than one window" in result.stderr
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(gpt2_dir, data_dir, quick_recipe_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["compress", gpt2_dir, "--recipe", quick_recipe_file, "--dataset", data_dir, "--out", out, "--steps", 2]
    result = run(*args)
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    result = run(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "report.json").exists() and not (out / "keep.txt").exists()


def test_default_output_name(gpt2_dir, data_dir, quick_recipe_file, tmp_path):
    result = run("compress", gpt2_dir, "--recipe", quick_recipe_file, "--dataset", data_dir, "--steps", 2,
                 "--sparsity", 0.25)
    assert result.exit_code == 0, result.output
    assert (tmp_path / f"{gpt2_dir.name}-tapc-s25" / "report.json").exists()


def test_same_seed_same_result(gpt2_dir, data_dir, quick_recipe_file, tmp_path):
    reports = []
    for name in ("a", "b"):
        result = run("compress", gpt2_dir, "--recipe", quick_recipe_file, "--dataset", data_dir,
                     "--out", tmp_path / name, "--json", "--steps", 6)
        assert result.exit_code == 0, result.output
        reports.append(json.loads(result.stdout))
    assert reports[0]["perplexity"]["pruned"]["ppl"] == reports[1]["perplexity"]["pruned"]["ppl"]
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
