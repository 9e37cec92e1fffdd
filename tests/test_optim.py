"""The TA optimizer: AdamW when the TA term is off, the thesis formula when it is on."""

from __future__ import annotations

import math

import pytest
import torch

from compressor.optim import TAAdamW


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 4, generator=gen, requires_grad=True), torch.randn(7, generator=gen, requires_grad=True)]


def _grads(step, params):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def test_ta_off_equals_torch_adamw():
    ours, ref = _params(), _params()
    opt = TAAdamW(ours, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, ta_lr=0.0)
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 20)
    torch_sched = torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda s: 1 - s / 20)
    for step in range(15):
        _grads(step, ours)
        _grads(step, ref)
        opt.step(loss=1.0)
        torch_opt.step()
        sched.step()
        torch_sched.step()
        for a, b in zip(ours, ref):
            assert torch.equal(a, b), f"differs from AdamW at step {step}"


def test_ta_term_matches_hand_computation():
    lr, ta_lr, gamma, beta, eps, clip, k, loss = 1e-3, 0.5, 1.3, 0.5, 1e-8, 100.0, 2.0, 2.7
    ours, ref = _params(), _params()
    _grads(0, ours)
    _grads(0, ref)
    opt = TAAdamW(ours, lr=lr, weight_decay=0.0, ta_lr=ta_lr, gamma=gamma, beta=beta, ta_eps=eps, clip=clip, k=k)
    opt.step(loss=loss)
    torch_opt = torch.optim.AdamW(ref, lr=lr, weight_decay=0.0, foreach=False)
    torch_opt.step()
    g2 = sum(float((p.grad.double() ** 2).sum()) for p in ref)
    scale = gamma * loss**beta / (g2 + eps)
    assert scale * math.sqrt(g2) < clip  # no saturation in this case
    coef = ta_lr * math.tanh(k * loss) * scale
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b - coef * b.grad, rtol=0, atol=1e-6)
    assert opt.last_ta["coef"] == pytest.approx(coef)


def test_ta_term_takes_the_known_gradient_norm():
    """A caller that knows the gradient norm (after clipping) gets the very same step."""
    runs = []
    for known in (False, True):
        params = _params()
        _grads(0, params)
        norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))
        opt = TAAdamW(params, lr=1e-3, weight_decay=0.0, ta_lr=0.5, clip=100.0)
        opt.step(loss=2.7, grad_norm=norm if known else None)
        runs.append((params, opt.last_ta["coef"]))
    (computed, coef), (given, coef_given) = runs
    # The two norms differ by float32 rounding (the dot products' order is the BLAS's, which
    # differs between CPUs), so a weight may land one ulp apart: bounds well above that,
    # far below the TA step itself (coef * |g| ~ 3e-2 here).
    assert coef_given == pytest.approx(coef, rel=1e-5)
    for a, b in zip(computed, given):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ta_term_saturates_at_clip():
    params = _params()
    _grads(0, params)
    before = [p.detach().clone() for p in params]
    clip, ta_lr = 1e-3, 1.0
    # lr tiny so the Adam part is negligible next to the TA part.
    opt = TAAdamW(params, lr=1e-12, weight_decay=0.0, ta_lr=ta_lr, clip=clip, k=100.0)
    opt.step(loss=4.0)
    moved = math.sqrt(sum(float(((p.detach() - b) ** 2).sum()) for p, b in zip(params, before)))
    assert moved == pytest.approx(ta_lr * clip * math.tanh(400.0), rel=1e-3)


def test_reference_target_switches_ta_off_below_reference():
    params = _params()
    _grads(0, params)
    opt = TAAdamW(params, lr=1e-3, ta_lr=1.0, ref_loss=3.0)
    opt.step(loss=2.5)
    assert opt.last_ta["coef"] == 0.0
    opt.step(loss=3.5)
    assert opt.last_ta["coef"] > 0.0


def test_adam_space_moves_along_adam_direction():
    params = _params()
    _grads(0, params)
    opt = TAAdamW(params, lr=1e-3, ta_lr=1.0, space="adam", clip=1e9)
    opt.step(loss=2.0)
    assert opt.last_ta["coef"] > 0.0


def test_masked_entries_untouched_by_adam_decay_and_ta():
    params = _params()
    masks = {params[0]: torch.rand(params[0].shape) > 0.5}
    before = params[0].detach().clone()
    opt = TAAdamW(params, lr=1e-2, weight_decay=0.5, ta_lr=1.0, masks=masks)
    for step in range(3):
        _grads(step, params)
        opt.step(loss=2.0)
    mask = masks[params[0]]
    assert torch.equal(params[0][~mask], before[~mask])
    assert not torch.equal(params[0][mask], before[mask])


def test_ta_needs_the_loss():
    params = _params()
    _grads(0, params)
    with pytest.raises(ValueError, match="needs the loss"):
        TAAdamW(params, ta_lr=1.0).step()
