"""The export's parity check passes a correct export with margin and fails the export bugs that matter.

Each bug is seeded for real: in the saved model the exporter reads (a rotary base or
rotary permutation that is wrong, a norm weight left out) or in how the graph is fed
(a cache one token short, so positions are off by one; a wrong attention mask). The
PyTorch model stays correct, as it would in the pipeline.
"""

from __future__ import annotations

import pytest
import torch

from compressor.export.parity import check_logits
from compressor.generation import OnnxDecoder
from compressor.testing import MUTATIONS, mutated_decoder

from .conftest import build_model

# Llama and Gemma-3 go through onnxruntime-genai's builder, GPT-2 through transformers' exporter.
# Gemma-3 at width 48: sqrt(48) = 6.928 is where the builder's rounded embedding scale showed.
WIDTH = {"llama": 64, "gemma3": 48, "gpt2": 64}


def _tiny(kind: str, vocab: int):
    """A tiny model with sharp attention (init 0.2) and norm weights that are not all one (or zero, Gemma)."""
    model = build_model(kind, vocab, init_range=0.2)
    if WIDTH[kind] != model.config.hidden_size:
        model.config.hidden_size = WIDTH[kind]
        torch.manual_seed(0)
        model = type(model)(model.config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture(scope="module", params=list(WIDTH))
def tiny(request, tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp(f"parity-{request.param}")
    model = _tiny(request.param, len(tokenizer))
    mutated_decoder(model, tokenizer, root, "correct")
    return request.param, model, root, tokenizer


def test_a_correct_export_passes_far_inside_its_tolerance(tiny):
    kind, model, root, _ = tiny
    before = {name: p.clone() for name, p in model.state_dict().items()}
    result = check_logits(model, OnnxDecoder(root / "onnx" / "model.onnx"))
    # The float64 pass converts the model in place and back: fp32 -> float64 -> fp32 is exact.
    assert all(p.dtype == before[name].dtype and torch.equal(p, before[name]) for name, p in model.state_dict().items())
    assert result["passed"] and result["exact_reference"], result
    # fp32 rounding of a 2-layer width-64 model moves logits of about 7 by ~1e-5 on any CPU (AVX2 or
    # AVX-512 only changes the order of sums); the tolerance is at least 1e-3: a margin of ~100.
    assert result["worst_fraction_of_tolerance"] < 0.05, result
    for case in result["cases"]:
        # The export is as exact as PyTorch's own fp32, which is what the tolerance's third term assumes.
        assert case["export_fp32_error"] <= 10 * case["pytorch_fp32_error"] + 1e-6, case


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_every_seeded_export_bug_fails_the_check(tiny, mutation):
    kind, model, root, tokenizer = tiny
    if kind == "gpt2" and mutation in ("rope_theta", "rotary_permutation"):
        pytest.skip("GPT-2 has learned absolute positions, no rotary embedding")
    result = check_logits(model, mutated_decoder(model, tokenizer, root, mutation))
    assert not result["passed"], result
    # Not a near miss: the bug moves the logits by many times the tolerance (10x at the very least).
    assert result["worst_fraction_of_tolerance"] > 10, result


def test_the_float64_reference_is_skipped_without_the_memory(tiny, monkeypatch):
    from compressor import memory

    kind, model, root, _ = tiny
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024)
    result = check_logits(model, OnnxDecoder(root / "onnx" / "model.onnx"), cases=((2, 6, 2),))
    assert result["passed"] and not result["exact_reference"]
    assert result["cases"][0]["pytorch_fp32_error"] is None
    assert result["cases"][0]["tolerance"] == max(1e-3, 1e-3 * result["cases"][0]["max_abs_logit"])

