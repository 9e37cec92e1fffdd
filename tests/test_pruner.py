"""Pruner invariants: exact sparsity, masks hold through optimizer steps, regrowth."""

from __future__ import annotations

import pytest
import torch

from compressor import pruner as pruner_mod
from compressor.optim import TAAdamW
from compressor.pruner import Pruner, global_masks, kth_smallest
from compressor.recipe import PruneConfig

from .conftest import build_model


def _batch(model, n=2, length=16):
    gen = torch.Generator().manual_seed(1)
    return torch.randint(model.config.vocab_size, (n, length), generator=gen)


def _train_step(model, pruner, opt, step):
    ids = _batch(model)
    loss = model(input_ids=ids, labels=ids).loss
    opt.zero_grad()
    loss.backward()
    pruner.observe(step)
    pruner.mask_gradients_()
    opt.step(loss=loss.item())
    return pruner.step(step, [loss.item()] * 4)


def _run(kind, config, steps=10, ta_lr=1e-2):
    model = build_model(kind, 97).train()
    pruner = Pruner(config, steps).prepare(model)
    opt = TAAdamW(model.parameters(), lr=1e-3, ta_lr=ta_lr, masks=pruner.param_masks())
    for step in range(1, steps + 1):
        _train_step(model, pruner, opt, step)
    return model, pruner


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("saliency", ["taylor", "magnitude"])
def test_final_sparsity_is_exact(kind, saliency):
    config = PruneConfig(sparsity=0.37, saliency=saliency, prune_every=2, warmup=0.1, tau=0.2, final=0.6)
    model, pruner = _run(kind, config)
    n = pruner.num_prunable()
    assert abs(pruner.num_masked() - 0.37 * n) <= 1  # integers: round(0.37 n) masked, within 1/2 of 0.37 n
    names = [f"{name}.weight" for name in pruner.modules]
    pruner.finalize()
    params = dict(model.named_parameters())
    zeros = sum(int((params[name] == 0).sum()) for name in names)
    assert abs(zeros - 0.37 * n) <= 1  # a count of exact zeros: the masked weights


def test_prunes_only_block_projections():
    model = build_model("llama", 97)
    pruner = Pruner(PruneConfig(), 10).prepare(model)
    assert all(name.startswith("model.layers.") for name in pruner.modules)
    assert len(pruner.modules) == 2 * 7  # q k v o gate up down per block


@pytest.mark.parametrize("grads_masked", [False, True])
def test_masked_weights_stay_zero_through_optimizer_steps(grads_masked):
    config = PruneConfig(sparsity=0.5, prune_every=1, warmup=0.0, tau=0.1, final=0.2)
    model = build_model("gpt2", 97).train()
    pruner = Pruner(config, 10).prepare(model)
    opt = TAAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, ta_lr=1e-2, masks=pruner.param_masks(),
                  grads_masked=grads_masked)
    for step in range(1, 11):
        _train_step(model, pruner, opt, step)
        if step >= pruner.final_step:
            # The mask is fixed: what the forward pass sees at masked positions is zero,
            # and the stored (kept) values at masked positions do not move.
            for name, module in pruner.modules.items():
                mask = pruner.masks[name]
                assert torch.all(module.weight[~mask] == 0)
            if step == pruner.final_step:
                kept = {n: w.detach()[~pruner.masks[n]].clone() for n, w in pruner.weights.items()}
    for name, weight in pruner.weights.items():
        assert torch.equal(weight.detach()[~pruner.masks[name]], kept[name])


def test_regrowth_restores_kept_values_and_keeps_count():
    config = PruneConfig(sparsity=0.5, saliency="magnitude", prune_every=1, warmup=0.0, tau=0.01, final=1.0)
    model = build_model("gpt2", 97)
    pruner = Pruner(config, 100).prepare(model)
    for p in model.parameters():  # fake a gradient so the step sees one
        p.grad = torch.zeros_like(p)
    pruner.step(50)
    k = pruner.num_masked()
    name = next(iter(pruner.modules))
    weight, mask = pruner.weights[name], pruner.masks[name]
    victim = (~mask).flatten().nonzero()[0].item()
    kept_value = weight.detach().flatten()[victim].item()
    assert kept_value != 0 and pruner.modules[name].weight.flatten()[victim].item() == 0
    with torch.no_grad():  # make the masked weight the most salient one
        weight.view(-1)[victim] = 1e3
    record = pruner.step(51)
    assert mask.flatten()[victim]
    assert pruner.modules[name].weight.flatten()[victim].item() == 1e3
    assert record["regrown"] >= 1 and pruner.num_masked() == k  # counts: the victim (score 1e3) grew back


def test_no_regrowth_keeps_masked_weights_masked():
    config = PruneConfig(sparsity=0.5, saliency="magnitude", prune_every=1, warmup=0.0, tau=0.01,
                         final=1.0, regrowth=False)
    model = build_model("gpt2", 97)
    pruner = Pruner(config, 100).prepare(model)
    pruner.step(50)
    name = next(iter(pruner.modules))
    victim = (~pruner.masks[name]).flatten().nonzero()[0].item()
    with torch.no_grad():
        pruner.weights[name].view(-1)[victim] = 1e3
    assert pruner.step(51)["regrown"] == 0
    assert not pruner.masks[name].flatten()[victim]


def test_global_masks_exact_with_ties():
    scores = [torch.tensor([0.0, 0.0, 1.0, 2.0]), torch.tensor([0.0, 0.0, 0.0, 5.0])]
    masks = global_masks(scores, 3)
    assert sum(int((~m).sum()) for m in masks) == 3
    assert masks[0][2:].all() and masks[1][3]


def test_kth_smallest_sampled_path_is_exact(monkeypatch):
    monkeypatch.setattr(pruner_mod, "EXACT_SELECT_LIMIT", 1000)
    monkeypatch.setattr(pruner_mod, "SAMPLE_SIZE", 2000)
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(300, 200, generator=gen), torch.rand(50_000, generator=gen) ** 3]
    flat = torch.cat([s.flatten() for s in scores])
    for k in (1, 17, 30_000, 81_234, flat.numel()):
        assert kth_smallest(scores, k) == flat.kthvalue(k).values.item()


def test_state_dict_round_trip():
    config = PruneConfig(sparsity=0.5, prune_every=2, warmup=0.0, tau=0.2, final=0.6)
    model, pruner = _run("gpt2", config, steps=4)
    state = pruner.state_dict()
    other = Pruner(config, 4).prepare(build_model("gpt2", 97))
    other.load_state_dict(state)
    assert all(torch.equal(other.masks[n], m) for n, m in pruner.masks.items())
    assert other.sparsity == pruner.sparsity


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_wanda_one_shot_uses_input_norms(kind):
    model = build_model(kind, 97)
    pruner = Pruner(PruneConfig(sparsity=0.5, saliency="global-wanda"), total_steps=1).prepare(model)
    pruner.calibrate(model, _batch(model, n=4), batch_size=2)
    for name, weight in pruner.weights.items():
        norm = pruner.input_norms[name]
        # Broadcasts along the input axis: (1, in) for nn.Linear, (in, 1) for GPT-2's Conv1D.
        assert norm.shape[0] == 1 or norm.shape[1] == 1
        assert (weight * norm).shape == weight.shape
        assert (norm > 0).all()  # sums of squares over 64 tokens: 0 only for an input that is 0 at every token
    pruner.step(1)
    assert pruner.num_masked() == round(0.5 * pruner.num_prunable())
    # Scaling one input feature up makes all its weights win over magnitude alone.
    name, module = next(iter(pruner.modules.items()))
    loud = torch.zeros_like(pruner.input_norms[name])
    loud.view(-1)[0] = 1e6
    pruner.input_norms[name] = pruner.input_norms[name] + loud
    pruner.step(1)
    mask = pruner.masks[name]
    column = mask[:, 0] if isinstance(module, torch.nn.Linear) else mask[0, :]
    assert column.all()


def test_wanda_without_calibration_says_how_to_fix():
    model = build_model("llama", 97)
    pruner = Pruner(PruneConfig(sparsity=0.3, saliency="global-wanda"), total_steps=1).prepare(model)
    with pytest.raises(ValueError, match="calibrate"):
        pruner.step(1)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("autocast", [False, True])
def test_masked_forward_matches_the_parametrized_weight(kind, autocast):
    """The layers compute with `w * mask` without keeping it; outputs and straight-through
    gradients must equal those of a plain forward through `module.weight` (= w * mask)."""
    model = build_model(kind, 97).eval()  # no dropout: both passes see the same function
    pruner = Pruner(PruneConfig(sparsity=0.5, saliency="magnitude"), 1).prepare(model)
    pruner.step(1)
    ids = _batch(model)

    def run(plain: bool):
        if plain:  # the forward every module had before prepare(), over the parametrized weight
            for module in pruner.modules.values():
                module.__dict__.pop("forward")
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = run(plain=False)
    ref_loss, ref_grads = run(plain=True)
    # Same matmuls on the same values: bit-equal with AVX-512, AVX2, SSE kernels; slack: fp32 ulps, a bf16 ulp (0.8%).
    tol = {"rtol": 2e-2, "atol": 1e-3} if autocast else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(loss, ref_loss, **tol)  # measured bit-equal (see tol)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **tol, msg=name)  # measured bit-equal (see tol)
    masked = ~pruner.masks[next(iter(pruner.masks))]
    # The straight-through gradient at masked weights: measured 0.28-5.9, 0 only if the path were cut.
    assert masked.any() and grads[next(n for n in grads if "original" in n)][masked].abs().sum() > 0
