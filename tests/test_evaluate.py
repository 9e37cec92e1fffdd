"""Perplexity against a hand computation of the protocol in docs/method.md (Perplexity protocol)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compressor.evaluate import perplexity

from .conftest import build_model


def _hand_nll(model, stream, windows):
    """Sum and count of NLL; each window is (begin, end, first scored position)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for begin, end, first in windows:
            logits = model(input_ids=stream[None, begin:end]).logits[0]
            for pos in range(first, end):
                total += -F.log_softmax(logits[pos - begin - 1], -1)[stream[pos]].item()
                count += 1
    return total, count


@pytest.fixture(scope="module")
def setup():
    model = build_model("gpt2", 97)
    stream = torch.randint(97, (70,), generator=torch.Generator().manual_seed(3))
    return model, stream


def test_non_overlapping_windows(setup):
    model, stream = setup
    result = perplexity(model, stream, 16, batch_size=3)
    # 70 tokens: 4 windows of 16 and a tail of 6; every token but each window's first is scored.
    total, count = _hand_nll(model, stream, [(0, 16, 1), (16, 32, 17), (32, 48, 33), (48, 64, 49), (64, 70, 65)])
    assert result.tokens == count == 65 and result.windows == 5
    # Batches of 3 windows against one window a call: logits a few ulps apart on any CPU, PPL ~1e-7 (measured equal).
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_sliding_window_scores_every_token_once(setup):
    model, stream = setup
    result = perplexity(model, stream, 16, stride=8)
    spans, scored_to, begin = [], 1, 0
    while True:
        end = min(begin + 16, 70)
        spans.append((begin, end, max(scored_to, begin + 1)))
        scored_to = end
        if end == 70:
            break
        begin += 8
    total, count = _hand_nll(model, stream, spans)
    assert result.tokens == count == 69
    # Batches of 4 windows against one window a call: logits a few ulps apart on any CPU, PPL ~1e-7 (measured equal).
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_token_limit(setup):
    model, stream = setup
    result = perplexity(model, stream, 16, max_tokens=32)
    assert result.tokens == 30 and result.max_tokens == 32
    assert "first 32 tokens" in result.protocol


def test_drift_from_a_reference_matches_a_direct_computation(setup):
    _, stream = setup
    # Two models with sharp, partly agreeing predictions: one, and the same with noise on every weight.
    model, other = build_model("gpt2", 97, init_range=0.2), build_model("gpt2", 97, init_range=0.2)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    result = perplexity(model, stream, 16, stride=8, reference=other)
    # By hand: each token scored once (sliding windows), KL(other || model) summed over the full vocabulary.
    kl, agree, count, scored_to, begin = 0.0, 0, 0, 1, 0
    with torch.no_grad():
        while True:
            end = min(begin + 16, 70)
            ids = stream[None, begin:end]
            p, q = (F.log_softmax(m(input_ids=ids).logits[0], -1) for m in (other, model))
            for pos in range(max(scored_to, begin + 1), end):
                row = pos - begin - 1
                kl += float((p[row].exp() * (p[row] - q[row])).sum())
                agree += int(p[row].argmax() == q[row].argmax())
                count += 1
            scored_to = end
            if end == 70:
                break
            begin += 8
    # KL 1.72 nats, batched vs one-window forwards: ulps in the log-probs move it ~1e-6 (measured equal); > 0 by far.
    assert result.kl == pytest.approx(kl / count, rel=1e-4) and result.kl > 0
    # Batched and one-window forwards round differently (per CPU), which can swap a near-tied top-1: allow two.
    assert result.agreement == pytest.approx(agree / count, abs=2 / count)
    itself = perplexity(model, stream, 16, reference=model)
    # Against itself: the same kernels on the same ids give bit-equal log-probs, so the KL is exactly 0 on any CPU.
    assert itself.kl == pytest.approx(0.0, abs=1e-6) and itself.agreement == 1.0
    assert perplexity(model, stream, 16).kl is None


def test_eval_reference_from_the_command_line(tmp_path, tokenizer, data_dir):
    import json

    from .conftest import run_cli, save_tiny

    dense = save_tiny(tmp_path / "dense", "llama", tokenizer)
    other = save_tiny(tmp_path / "other", "llama", tokenizer, init_range=0.05)
    args = ("--dataset", data_dir, "--seq-len", 32, "--eval-tokens", 200, "--json")
    same = json.loads(run_cli("eval", dense, "--reference", dense, *args).stdout)["perplexity"]
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["agreement"] == 1.0  # same weights, same kernels: KL 0
    result = run_cli("eval", other, "--reference", dense, *args)
    assert result.exit_code == 0, result.output
    drift = json.loads(result.stdout)
    # Two different random models: KL measured 0.043 nats, 1e5x the rounding of an fp32 KL.
    assert drift["perplexity"]["kl"] > 0 and drift["reference"]["path"] == str(dense.resolve())
    from compressor.folder import save_model

    save_model(build_model("llama", 50), tokenizer, tmp_path / "small", {})  # another vocabulary
    result = run_cli("eval", dense, "--reference", tmp_path / "small", *args)
    assert result.exit_code == 2 and "same tokenizer" in result.output
