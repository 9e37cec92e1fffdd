"""N:M sparsity: the pattern holds in every group, along the input dimension, through the whole job."""

from __future__ import annotations

import pytest
import torch

from compressor.errors import UsageError
from compressor.patterns import Pattern, candidate_mask, parse_pattern, selection_keys, violations
from compressor.pruner import Pruner, global_masks
from compressor.recipe import PruneConfig, load_recipe

from .conftest import build_model

TWO_FOUR = Pattern(2, 4)


def test_parse_pattern():
    assert parse_pattern("unstructured") == Pattern() and str(parse_pattern("2:4")) == "2:4"
    assert parse_pattern("2:4").min_sparsity == 0.5
    for bad in ["4:2", "0:4", "2-4", "dense"]:
        with pytest.raises(ValueError):
            parse_pattern(bad)


def test_recipe_checks_pattern_against_sparsity():
    assert load_recipe(None, {"prune.pattern": "2:4", "prune.sparsity": 0.5}).prune.pattern == "2:4"
    with pytest.raises(UsageError, match="use --sparsity 0.5 or higher"):
        load_recipe(None, {"prune.pattern": "2:4", "prune.sparsity": 0.3})
    with pytest.raises(UsageError, match="unknown pattern"):
        load_recipe(None, {"prune.pattern": "sometimes"})


def test_candidates_are_the_lowest_in_each_group_along_the_input_dim():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.6, 0.7, 0.8]])
    assert candidate_mask(score, 1, TWO_FOUR).tolist() == [[False, True, False, True, True, True, False, False]]
    # The same scores stored (in, out), as GPT-2's Conv1D does, group along dim 0.
    assert torch.equal(candidate_mask(score.T, 0, TWO_FOUR), candidate_mask(score, 1, TWO_FOUR).T)


@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.7])
def test_global_selection_keeps_the_pattern_and_the_exact_count(sparsity):
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(16, 32, generator=gen), torch.rand(64, 8, generator=gen) * 3]
    dims = [1, 0]
    k = round(sparsity * sum(s.numel() for s in scores))
    masks = global_masks(selection_keys(scores, dims, k, TWO_FOUR), k)
    assert sum(int((~m).sum()) for m in masks) == k
    if sparsity >= 0.5:
        for mask, dim in zip(masks, dims):
            assert violations(mask.float(), dim, TWO_FOUR)[0] == 0
    if sparsity <= 0.5:
        # Up to (M-N)/M only candidates go (on the way to the pattern): the two best of
        # every group survive, whatever their global rank.
        for s, m, d in zip(scores, masks, dims):
            assert not (~m & ~candidate_mask(s, d, TWO_FOUR)).any()


def test_violations_count_groups_and_depend_on_the_axis():
    weight = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    assert violations(weight, 1, TWO_FOUR) == (1, 2)
    wide = torch.tensor([[1.0, 0.0, 1.0, 0.0]] * 4)  # 2:4 along rows, but not along columns
    assert violations(wide, 1, TWO_FOUR) == (0, 4) and violations(wide, 0, TWO_FOUR)[0] == 2


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_dynamic_pruning_with_regrowth_keeps_two_four(kind):
    model = build_model(kind, 320)
    config = PruneConfig(sparsity=0.6, pattern="2:4", prune_every=1, warmup=0.0, final=0.8, tau=0.2)
    pruner = Pruner(config, 10).prepare(model)
    gen = torch.Generator().manual_seed(0)
    regrown = 0
    for step in range(1, 9):
        ids = torch.randint(320, (2, 16), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        pruner.observe(step)
        with torch.no_grad():  # move the weights so scores change and weights come back
            for w in pruner.weights.values():
                w.add_(torch.randn(w.shape, generator=gen) * 0.05)
        record = pruner.step(step, [3.0, 3.1])
        model.zero_grad()
        regrown += record["regrown"] if record else 0
        for name, module in pruner.modules.items():
            assert violations(module.weight, pruner.input_dims[name], TWO_FOUR)[0] == 0 or record["target"] < 0.5
    assert regrown > 0
    assert pruner.num_masked() == round(0.6 * pruner.num_prunable())
    pruner.finalize()
    for name, module in pruner.modules.items():
        assert violations(module.weight, pruner.input_dims[name], TWO_FOUR)[0] == 0


def test_widths_not_divisible_by_m_are_refused(tokenizer):
    from torch import nn

    model = build_model("llama", len(tokenizer))
    model.model.layers[0].mlp.down_proj = nn.Linear(126, 64, bias=False)
    with pytest.raises(UsageError, match="divisible by 4"):
        Pruner(PruneConfig(sparsity=0.5, pattern="2:4"), 10).prepare(model)
