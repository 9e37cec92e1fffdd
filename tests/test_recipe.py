"""Recipes: every shipped file loads, bad ones fail with one line that says why."""

from __future__ import annotations

from pathlib import Path

import pytest

from compressor.errors import UsageError
from compressor.recipe import builtin_recipes, load_recipe, recipe_to_yaml

REPO_RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("path", sorted(REPO_RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_file_loads(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem


def test_builtin_names_and_default():
    assert {"gpt2-wikitext2", "quick-cpu", "thesis"} <= set(builtin_recipes())
    assert load_recipe("quick-cpu").train.steps == 120
    # The default job is a file, not the schema: the full budget on a CUDA GPU, the quick one elsewhere.
    for device, name in (("cuda", "gpt2-wikitext2"), ("cpu", "quick-cpu")):
        assert load_recipe(None, {"device": device}) == load_recipe(name, {"device": device})
    for name in ("gpt2-wikitext2", "thesis"):  # the thesis budget and AdamW settings (Tables 5.1/5.2)
        r = load_recipe(name)
        assert (r.optim.lr, r.optim.weight_decay, r.optim.grad_clip) == (5e-5, 0.01, 1.0)
        assert (r.ta.gamma, r.ta.beta, r.prune.sparsity, r.train.epochs) == (1.0, 0.5, 0.3, 3)
    # The TA step the recovery benchmark chose (README, Results); the thesis's eta_TA = lr kept apart.
    assert load_recipe(None).ta.lr == load_recipe("quick-cpu").ta.lr == 0.1
    thesis = load_recipe("thesis")  # the thesis constants, kept as their own recipe
    assert thesis.ta.enabled and thesis.ta.lr is None  # eta_TA = lr
    # Issue 14: the shipped jobs distil from the dense model; domain-adapt is quick-cpu with
    # cross-entropy on the training text (as the thesis), nothing else changed.
    assert load_recipe(None).train.loss == load_recipe("quick-cpu").train.loss == "kd"
    assert thesis.train.loss == "ce"
    adapt, quick = load_recipe("domain-adapt"), load_recipe("quick-cpu")
    assert adapt.train.loss == "ce"
    # but the lr: quick-cpu's table by sparsity was chosen under kd, domain-adapt keeps the cross-entropy choice
    assert (quick.optim.lr, adapt.optim.lr) == (5e-5, 2e-4)
    differ = {"name": True, "description": True, "train": True, "optim": {"lr"}}
    assert adapt.model_dump(exclude=differ) == quick.model_dump(exclude=differ)
    assert adapt.train.model_dump(exclude={"loss"}) == quick.train.model_dump(exclude={"loss"})


def test_overrides_win():
    recipe = load_recipe("quick-cpu", {"prune.sparsity": 0.5, "train.steps": 7, "data.seq_len": None})
    assert recipe.prune.sparsity == 0.5 and recipe.train.steps == 7 and recipe.data.seq_len == 256


def test_tables_by_target_sparsity_give_the_values_of_the_target(tmp_path):
    table = {0.3: 1e-4, 0.5: 2e-4}
    lrs = [load_recipe("thesis", {"optim.lr": table, "prune.sparsity": s}).optim.lr for s in (0.1, 0.3, 0.4, 0.5, 0.9)]
    assert lrs == [1e-4, 1e-4, pytest.approx(1.5e-4), 2e-4, 2e-4]  # the ends outside, linear between
    quick = [load_recipe("quick-cpu", {"prune.sparsity": s}) for s in (0.3, 0.4, 0.5, 0.7)]  # issue 11's choices
    assert [(r.optim.lr, r.prune.warmup) for r in quick] == [(5e-5, 0.1), (1e-4, 0.1), (2e-4, 0.05), (2e-4, 0.05)]
    recipe = load_recipe("quick-cpu", {"optim.lr": table, "prune.warmup": {0.3: 0.1, 0.5: 0.05}, "prune.sparsity": 0.4})
    assert recipe.prune.warmup == pytest.approx(0.075)
    path = tmp_path / "ran.yaml"  # OUT/recipe.yaml: the numbers the run used
    path.write_text(recipe_to_yaml(recipe))
    assert load_recipe(path, {"prune.sparsity": 0.7}) == recipe.model_copy(update={"prune": recipe.prune.model_copy(
        update={"sparsity": 0.7})})


@pytest.mark.parametrize(
    "text, message",
    [
        ("optim: {lr: {}}\n", "optim.lr table {} needs one or more"),
        ("prune: {warmup: {1.5: 0.1}}\n", "prune.warmup table .* sparsities in"),
        ("prune: {sparsity: high}\noptim: {lr: {0.3: 1.0e-4}}\n", "prune.sparsity: Input should be a valid number"),
        ("prune: {sparsty: 0.3}\n", "prune.sparsty: unknown key"),
        ("prune: {sparsity: high}\n", "prune.sparsity: Input should be a valid number"),
        ("prune: {sparsity: 1.5}\n", "prune.sparsity"),
        ("prune: {warmup: 0.5, final: 0.4}\n", "must be after prune.warmup"),
        ("ta: {space: adam, before_clip: true}\n", "ta.before_clip needs ta.space: gradient"),
        ("optim: [1, 2\n", "not valid YAML"),
        ("- 1\n- 2\n", "must be a YAML mapping"),
    ],
)
def test_bad_recipes(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message) as info:
        load_recipe(path)
    assert "\n" not in str(info.value)


def test_unknown_recipe_name_lists_builtins():
    with pytest.raises(UsageError, match="quick-cpu"):
        load_recipe("no-such-recipe")
