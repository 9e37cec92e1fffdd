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
    assert scale * math.sqrt(g2) < clip  # no saturation in this case: float64, 0.40 against C = 100
    coef = ta_lr * math.tanh(k * loss) * scale
    for a, b in zip(ours, ref):
        # Adam parts are bitwise torch's (above); p - coef * g rounds once or twice: <= 1 ulp of |w| < 4 (2.4e-7).
        torch.testing.assert_close(a, b - coef * b.grad, rtol=0, atol=1e-6)
    # The optimizer's ||g||^2 is fp32 dots (20 and 7 terms): any order, FMA or not, within 7e-8 of it; rel=1e-6.
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
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # an ulp of |w| < 4 (2.4e-7) at most; measured equal


def test_ta_term_before_clipping_uses_the_unclipped_gradient():
    """before_clip: Psi = gamma E^beta / ||g||^2 * g of the gradient before clipping (thesis),
    where the default, after clipping, saturates (||Psi|| = E^beta / ||g_c|| >= E^beta > C)."""
    lr, ta_lr, loss, grad_clip = 1e-3, 0.5, 2.7, 1.0
    steps = {}
    for before_clip in (False, True):
        params, ref = _params(), _params()
        _grads(0, params)
        _grads(0, ref)
        raw = [p.grad.clone() for p in params]
        unclipped = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        torch.nn.utils.clip_grad_norm_(ref, grad_clip)
        assert unclipped > 3 * grad_clip  # the raw gradient is much longer than the clip (5.33 of seeded randn)
        opt = TAAdamW(params, lr=lr, weight_decay=0.0, ta_lr=ta_lr, before_clip=before_clip)
        opt.step(loss=loss, grad_norm=unclipped.clamp(max=grad_clip), unclipped_norm=unclipped)
        torch.optim.AdamW(ref, lr=lr, weight_decay=0.0, foreach=False).step()
        steps[before_clip] = [a.detach() - b.detach() for a, b in zip(params, ref)]  # the TA part of the step
        if before_clip:
            g2 = float(unclipped.double()) ** 2
            psi_norm = loss**0.5 / math.sqrt(g2)
            assert psi_norm < 1.0  # C = 1 does not bind here (0.31, float64)
            for step, g in zip(steps[True], raw):
                # One float32 rounding of a weight of magnitude up to ~4 (an ulp: 4.8e-7) bounds the error.
                torch.testing.assert_close(step, -ta_lr * math.tanh(loss) * loss**0.5 / g2 * g, rtol=1e-4, atol=1e-6)
            assert not opt.last_ta["saturated"]
        else:
            assert opt.last_ta["saturated"]
    length = lambda ds: math.sqrt(sum(float((d.double() ** 2).sum()) for d in ds))  # noqa: E731
    # Steps of ~0.1 a coordinate read back from fp32 weights |w| < 4 (1.2e-7 each): <= 2e-6 at worst, measured 2e-8.
    assert length(steps[False]) == pytest.approx(ta_lr * math.tanh(loss) * 1.0, rel=1e-4)  # eta_TA tanh(kE) C
    # Steps of ~0.03 a coordinate (the same reading): <= 5e-6 relative at worst, measured 6e-9.
    assert length(steps[True]) == pytest.approx(ta_lr * math.tanh(loss) * loss**0.5 / float(unclipped), rel=1e-4)
    with pytest.raises(ValueError, match="gradient space"):
        TAAdamW(_params(), ta_lr=1.0, space="adam", before_clip=True)


def test_ta_term_saturates_at_clip():
    params = _params()
    _grads(0, params)
    before = [p.detach().clone() for p in params]
    clip, ta_lr = 1e-3, 1.0
    # lr tiny so the Adam part is negligible next to the TA part.
    opt = TAAdamW(params, lr=1e-12, weight_decay=0.0, ta_lr=ta_lr, clip=clip, k=100.0)
    opt.step(loss=4.0)
    moved = math.sqrt(sum(float(((p.detach() - b) ** 2).sum()) for p, b in zip(params, before)))
    # A 1e-3 step read back from fp32 weights |w| <= 2 (6e-8 a coordinate): <= 3e-4 at worst, measured 7e-6.
    assert moved == pytest.approx(ta_lr * clip * math.tanh(400.0), rel=1e-3)


def test_reference_target_switches_ta_off_below_reference():
    params = _params()
    _grads(0, params)
    opt = TAAdamW(params, lr=1e-3, ta_lr=1.0, ref_loss=3.0)
    opt.step(loss=2.5)
    assert opt.last_ta["coef"] == 0.0
    opt.step(loss=3.5)
    assert opt.last_ta["coef"] > 0.0  # E = 0.5: a product of positive factors, a sign, not a rounding


def test_adam_space_moves_along_adam_direction():
    params = _params()
    _grads(0, params)
    opt = TAAdamW(params, lr=1e-3, ta_lr=1.0, space="adam", clip=1e9)
    opt.step(loss=2.0)
    assert opt.last_ta["coef"] > 0.0  # <g, d> with Adam's first d ~ sign(g) is sum |g| > 0: a sign


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


def test_training_passes_the_norm_before_clipping_to_the_ta_term():
    """`ta.before_clip` in a real training step: the coefficient is gamma E^beta tanh(kE) eta_TA / (||g|| ||g_c||),
    with ||g|| the gradient's norm before `optim.grad_clip`, measured here on the same batch."""
    from compressor.recipe import load_recipe
    from compressor.train import BatchOrder, build_optimizer, train

    from .conftest import build_model

    windows = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    grad_clip = 1e-2  # far below the gradient's norm
    coefs = {}
    for before_clip in (False, True):
        model = build_model("llama", 64, init_range=0.2).train()
        recipe = load_recipe("quick-cpu", {"optim.grad_clip": grad_clip, "optim.weight_decay": 0.0, "ta.lr": 0.5,
                                           "ta.clip": 1e6, "ta.before_clip": before_clip, "train.loss": "ce",
                                           "train.eval_every": 0, "train.batch_size": 1})
        probe = build_model("llama", 64, init_range=0.2).train()
        ids = BatchOrder(windows, 1, recipe.seed)(0)
        loss = probe(input_ids=ids, labels=ids).loss
        loss.backward()
        raw = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in probe.parameters()))
        assert raw > 10 * grad_clip  # 13.1 against 0.1
        log = train(model, None, build_optimizer(model, recipe, None, None), windows, windows, recipe, 1,
                    torch.device("cpu"))
        energy = log.loss[0]
        assert energy == pytest.approx(loss.item(), rel=1e-5)  # same model, batch and kernels: measured equal
        seen = raw if before_clip else grad_clip  # the norm of the gradient the term is computed from
        coefs[before_clip] = log.ta_coef[0]
        expected = 0.5 * math.tanh(energy) * energy**0.5 / (seen * grad_clip + 1e-8)  # ta.eps 1e-8
        # ||g|| from fp32 norms (clip_grad_norm_) against float64 here: ~1e-7 apart, measured 7e-8.
        assert log.ta_coef[0] == pytest.approx(expected, rel=1e-4)
    assert coefs[True] < coefs[False] / 10  # their ratio is grad_clip / ||g|| = 0.01 / 13.1: 7.6e-4
