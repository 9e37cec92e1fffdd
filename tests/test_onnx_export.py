"""ONNX export against PyTorch with onnxruntime, int8 quantization, and failures that keep the rest."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from compressor import onnx_export
from compressor.cli import cli
from compressor.errors import JobError
from compressor.onnx_export import OnnxCausalLM, check_against_torch, export_onnx, quantize_int8

from .conftest import build_model


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def exported(request, tmp_path_factory):
    model = build_model(request.param, 320)
    folder = tmp_path_factory.mktemp(f"onnx-{request.param}")
    info = export_onnx(model, folder, atol=1e-4)
    return model, folder, info


def test_onnx_matches_torch_on_other_shapes(exported):
    model, folder, info = exported
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids"]
    assert session.get_inputs()[0].shape == ["batch", "sequence"]  # both axes dynamic
    assert [o.name for o in session.get_outputs()] == ["logits"]
    assert [d["shape"] for d in info["shapes"]] == [[1, 5], [3, 17], [1, 64]]
    assert info["max_abs_diff"] <= 1e-4
    # An independent check on shapes the export never saw, through the evaluation wrapper.
    wrapped = OnnxCausalLM(folder / "model.onnx")
    for shape in [(4, 9), (2, 128)]:
        ids = torch.randint(320, shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = model(input_ids=ids).logits
        assert torch.allclose(wrapped(input_ids=ids).logits, expected, atol=1e-4, rtol=0)


def test_int8_runs_stays_close_and_is_smaller(exported):
    model, folder, info = exported
    int8 = quantize_int8(model, folder)
    assert (folder / "model.int8.onnx").stat().st_size < (folder / "model.onnx").stat().st_size
    assert 0 < int8["max_abs_diff"] < 0.1  # quantization changes the logits, but only a little
    ids = torch.randint(320, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = torch.softmax(model(input_ids=ids).logits, -1)
    got = torch.softmax(OnnxCausalLM(folder / "model.int8.onnx")(input_ids=ids).logits, -1)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_mismatch_beyond_tolerance_fails_and_keeps_no_file(tmp_path, monkeypatch):
    def off_by_half(model, path, vocab, shapes=(), seed=0):
        real = check_against_torch(model, path, vocab, shapes, seed)
        return {"shapes": [{**d, "max_abs_diff": d["max_abs_diff"] + 0.5} for d in real["shapes"]],
                "max_abs_diff": real["max_abs_diff"] + 0.5}

    monkeypatch.setattr(onnx_export, "check_against_torch", off_by_half)
    with pytest.raises(JobError, match=r"disagrees with PyTorch beyond atol 0.001 \(1x5: 0.5"):
        export_onnx(build_model("gpt2", 320), tmp_path / "onnx", atol=1e-3)
    assert not (tmp_path / "onnx" / "model.onnx").exists()


def test_compress_writes_checked_onnx_and_int8_perplexity(gpt2_dir, data_dir, quick_recipe_file, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["compress", str(gpt2_dir), "--recipe", str(quick_recipe_file), "--dataset",
                                      str(data_dir), "--out", str(out), "--onnx", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    onnx, int8 = report["export"]["onnx"], report["export"]["int8"]
    assert onnx["path"] == "onnx/model.onnx" and (out / onnx["path"]).is_file()
    assert (out / "onnx" / "config.json").is_file() and (out / "onnx" / "tokenizer.json").is_file()
    assert onnx["max_abs_diff"] <= onnx["atol"]
    pruned, quantized = report["perplexity"]["pruned"], int8["perplexity"]
    assert quantized["tokens"] == pruned["tokens"] and quantized["protocol"] == pruned["protocol"]
    assert quantized["ppl"] == pytest.approx(pruned["ppl"], rel=0.05)
    assert quantized["ppl"] != pruned["ppl"]  # really the int8 model, not the torch one again


def test_failed_onnx_export_keeps_the_rest(gpt2_dir, data_dir, quick_recipe_file, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::imaginary")

    monkeypatch.setattr(torch.onnx, "export", broken)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["compress", str(gpt2_dir), "--recipe", str(quick_recipe_file), "--dataset",
                                      str(data_dir), "--out", str(out), "--onnx", "--steps", "2", "--json"])
    assert result.exit_code == 1, result.output
    printed = json.loads(result.stdout)  # --json still prints the report of what was written
    assert "aten::imaginary" in printed["export"]["onnx"]["error"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "ONNX export failed" in errors[0] and "aten::imaginary" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == ["layers.png", "model", "recipe.yaml", "report.json",
                                                     "report.md", "sparse", "training.png", "training_log.json"]
    report = json.loads((out / "report.json").read_text())
    assert "aten::imaginary" in report["export"]["onnx"]["error"]
    assert (out / "model" / "model.safetensors").is_file()


def test_onnx_perplexity_wrapper_agrees_with_torch(exported):
    from compressor.evaluate import perplexity

    model, folder, _ = exported
    tokens = torch.randint(320, (700,), generator=torch.Generator().manual_seed(3))
    ours = perplexity(OnnxCausalLM(folder / "model.onnx"), tokens, 64)
    reference = perplexity(model, tokens, 64)
    assert ours.tokens == reference.tokens
    assert np.isclose(ours.ppl, reference.ppl, rtol=1e-5)
