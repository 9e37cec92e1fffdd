"""What `compress` writes for deployment, and failures that keep everything else."""

from __future__ import annotations

import json

import pytest

from compressor.export import graph

from .conftest import run_cli


def _compress(gpt2_dir, data_dir, recipe, out, *extra):
    return run_cli("compress", gpt2_dir, "--recipe", recipe, "--dataset", data_dir, "--out", out, "--onnx", "--json",
                   *extra)


def test_compress_writes_checked_kv_onnx_and_quantized_models(gpt2_dir, data_dir, quick_recipe_file, tmp_path):
    out = tmp_path / "out"
    result = _compress(gpt2_dir, data_dir, quick_recipe_file, out)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    exported, pruned = report["export"], report["perplexity"]["pruned"]
    onnx = exported["onnx"]
    assert onnx["path"] == "onnx/model.onnx" and (out / onnx["path"]).is_file()
    for name in ("config.json", "tokenizer.json", "genai_config.json"):
        assert (out / "onnx" / name).is_file()
    # A margin of ~100 on any CPU: fp32 rounding of the tiny model is ~1e-5 against a tolerance of at least 1e-3.
    assert onnx["logits"]["passed"] and onnx["logits"]["worst_fraction_of_tolerance"] < 0.05
    assert len(onnx["logits"]["cases"]) == 3
    assert len(onnx["greedy"]) == 3 and all(g["identical"] for g in onnx["greedy"])
    for kind in ("int8", "int4"):
        q = exported[kind]
        assert (out / q["path"]).is_file() and q["path"] == f"onnx-{kind}/model.onnx"
        quantized = q["perplexity"]
        assert quantized["tokens"] == pruned["tokens"] and quantized["protocol"] == pruned["protocol"]
        assert q["ppl_increase"] == pytest.approx(quantized["ppl"] / pruned["ppl"] - 1)
        assert 0 < q["top1_agreement"] <= 1 and q["bytes_ratio"] < 1
        assert [g["prompt_tokens"] for g in q["greedy"]] == [g["prompt_tokens"] for g in onnx["greedy"]]
    assert exported["int4"]["calibration_windows"] == 32  # GPTQ on the run's first 32 training windows
    page = (out / "report.md").read_text()
    assert "## Edge export" in page and "identical to PyTorch's for 3" in page and "onnx-int4/model.onnx" in page
    assert run_cli("compare", out).exit_code == 0


def test_quantize_none_writes_only_fp32(gpt2_dir, data_dir, quick_recipe_file, tmp_path):
    out = tmp_path / "out"
    result = _compress(gpt2_dir, data_dir, quick_recipe_file, out, "--quantize", "none", "--steps", "2")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("onnx")) == ["onnx"]
    assert set(json.loads(result.stdout)["export"]) == {"onnx", "sparse"}


def test_failed_onnx_export_keeps_the_rest(gpt2_dir, data_dir, quick_recipe_file, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::imaginary")

    monkeypatch.setattr(graph, "_export_with_transformers", broken)
    out = tmp_path / "out"
    result = _compress(gpt2_dir, data_dir, quick_recipe_file, out, "--steps", "2")
    assert result.exit_code == 1, result.output
    printed = json.loads(result.stdout)  # --json still prints the report of what was written
    assert "aten::imaginary" in printed["export"]["onnx"]["error"] and "int4" not in printed["export"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "ONNX export failed" in errors[0] and "aten::imaginary" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == ["layers.png", "model", "recipe.yaml", "report.json",
                                                     "report.md", "sparse", "training.png", "training_log.json"]
    assert "aten::imaginary" in json.loads((out / "report.json").read_text())["export"]["onnx"]["error"]
    assert "The ONNX export failed" in (out / "report.md").read_text()


def test_parity_failure_keeps_no_onnx_folder(gpt2_dir, data_dir, quick_recipe_file, tmp_path, monkeypatch):
    from compressor import generation
    from compressor.testing import CacheOneShort

    # A real bug in how the graph is fed: decode steps see the cache one token short.
    monkeypatch.setattr(generation, "OnnxDecoder", CacheOneShort)
    out = tmp_path / "out"
    result = _compress(gpt2_dir, data_dir, quick_recipe_file, out, "--steps", "2")
    assert result.exit_code == 1
    assert "the ONNX model disagrees with PyTorch (1x5+3: " in result.stderr and "> tolerance" in result.stderr
    assert not any(p.name.startswith("onnx") for p in out.iterdir())


@pytest.mark.parametrize("value", ["int3", "int8,int8", "fp16"])
def test_bad_quantize_values_exit_2(gpt2_dir, data_dir, quick_recipe_file, tmp_path, value):
    result = _compress(gpt2_dir, data_dir, quick_recipe_file, tmp_path / "out", "--quantize", value)
    assert result.exit_code == 2 and "--quantize" in result.stderr
    assert not (tmp_path / "out").exists()


def test_old_int8_recipe_key_says_what_replaced_it(tmp_path):
    from compressor.errors import UsageError
    from compressor.recipe import load_recipe

    path = tmp_path / "old.yaml"
    path.write_text("export: {int8: true}\n")
    with pytest.raises(UsageError, match=r"export.quantize"):
        load_recipe(path)
