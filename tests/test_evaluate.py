"""Perplexity against a hand computation of the SPEC.md protocol."""

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
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_token_limit(setup):
    model, stream = setup
    result = perplexity(model, stream, 16, max_tokens=32)
    assert result.tokens == 30 and result.max_tokens == 32
    assert "first 32 tokens" in result.protocol
