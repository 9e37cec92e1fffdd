"""The `tapc` command end to end through CliRunner, on tiny local models and text."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from compressor import __version__
from compressor.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_version_and_help():
    result = run("--version")
    assert result.exit_code == 0 and __version__ in result.output
    for command in ([], ["compress"]):
        result = run(*command, "--help")
        assert result.exit_code == 0 and "Usage" in result.output


def test_compress_end_to_end(model_dir, data_dir, quick_recipe_file, tmp_path):
    out = tmp_path / "out"
    result = run("compress", model_dir, "--recipe", quick_recipe_file, "--dataset", data_dir,
                 "--out", out, "--sparsity", 0.4, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["recipe"]["prune"]["sparsity"] == 0.4
    assert sorted(p.name for p in out.iterdir()) == ["model", "recipe.yaml", "report.json", "training_log.json"]
    assert json.loads((out / "report.json").read_text())["sparsity"] == report["sparsity"]
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
