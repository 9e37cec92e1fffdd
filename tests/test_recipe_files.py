"""The shipped recipes: each loads, reads in seconds (a short comment, then only what it changes from its
base), and does what its comment says. Tuned magnitudes are not pinned here: a retune edits a recipe, not
these tests."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from compressor.recipe import Recipe, builtin_recipes, default_recipe, load_recipe, recipe_data, recipe_to_yaml

REPO_RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FILES = sorted(REPO_RECIPES.glob("*.yaml"))
OWN = {"name", "description", "base"}  # a recipe's own, never inherited


def _raw(name):
    return yaml.safe_load((REPO_RECIPES / f"{name}.yaml").read_text())


def _leaves(data, prefix=""):
    """(dotted key, value) for every field a recipe mapping sets; a table by sparsity is one value."""
    for key, value in data.items():
        if isinstance(value, dict) and not prefix:
            yield from _leaves(value, f"{key}.")
        else:
            yield f"{prefix}{key}", value


def _value(data, dotted):
    for key in dotted.split("."):
        data = data[key]
    return data


def _without(recipe, *dotted):
    """The recipe's fields as JSON, less the dotted ones (and its name and description)."""
    data = recipe.model_dump(mode="json")
    for key in ("name", "description", *dotted):
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        del node[leaf]
    return data


def test_the_repository_folder_is_the_builtin_one():
    assert [p.stem for p in FILES] == builtin_recipes()


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_recipe_file_loads(path, tmp_path):
    recipe = load_recipe(path)
    assert recipe == load_recipe(path.stem)
    assert recipe.name == path.stem and recipe.description
    ran = tmp_path / "recipe.yaml"  # what a run writes: the whole recipe, which loads back the same
    ran.write_text(recipe_to_yaml(recipe))
    assert "base" not in yaml.safe_load(ran.read_text()) and load_recipe(ran) == recipe


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_recipe_starts_with_a_short_comment_and_no_history(path):
    lines = path.read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    assert 2 <= header <= 4, f"{path.name}: {header} comment lines before the first key, want 2 to 4"
    history = re.compile(r"issue[ ]#?\d+|\b20\d\d-\d\d|this[ ]stop|until[ ]20\d\d", re.IGNORECASE)
    assert not [line for line in lines if history.search(line)], "history belongs in the CHANGELOG"


@pytest.mark.parametrize("path", [p for p in FILES if "base" in yaml.safe_load(p.read_text())], ids=lambda p: p.name)
def test_a_recipe_with_a_base_holds_only_what_it_changes(path):
    raw = yaml.safe_load(path.read_text())
    assert raw["base"] in builtin_recipes()
    base = Recipe().model_dump(mode="json")  # the base as it runs: its files over the schema's defaults
    for dotted, value in _leaves(recipe_data(raw["base"])):
        *section, key = dotted.split(".")
        (base[section[0]] if section else base)[key] = value
    same = [dotted for dotted, value in _leaves(raw) if dotted not in OWN
            and yaml.safe_load(yaml.safe_dump(value)) == yaml.safe_load(yaml.safe_dump(_value(base, dotted)))]
    assert not same, f"{path.name} repeats its base {raw['base']}: {same}"


def test_the_builtins_form_one_tree_rooted_at_the_cpu_default():
    roots = [name for name in builtin_recipes() if "base" not in _raw(name)]
    assert roots == [default_recipe("cpu")[0]]
    for name in builtin_recipes():  # every chain ends at the root
        seen = [name]
        while "base" in _raw(seen[-1]):
            seen.append(_raw(seen[-1])["base"])
            assert len(seen) <= len(builtin_recipes())
        assert seen[-1] == roots[0]


def test_quick_cpu_prunes_while_distilling_on_a_cpu_budget():
    quick = load_recipe("quick-cpu")
    assert default_recipe("cpu")[0] == "quick-cpu"
    assert quick.prune.method == "dynamic" and quick.prune.saliency == "taylor"
    assert quick.ta.enabled and quick.ta.lr is not None  # its own eta_TA, not the AdamW lr
    assert quick.train.loss == "kd"  # distilled from the dense model
    assert 0 < quick.train.steps and quick.train.batch_size == 1 and quick.data.seq_len is not None
    assert quick.eval.max_tokens is not None  # the first test tokens, not the whole split


def test_domain_adapt_is_quick_cpu_with_cross_entropy():
    adapt, quick = load_recipe("domain-adapt"), load_recipe("quick-cpu")
    assert _raw("domain-adapt")["base"] == "quick-cpu"
    assert adapt.train.loss == "ce"
    assert adapt.train.model_dump(exclude={"loss"}) == quick.train.model_dump(exclude={"loss"})  # quick-cpu's budget
    # Only the learning rate and its warmup are chosen apart, for cross-entropy.
    assert _without(adapt, "train.loss", "optim.lr", "prune.warmup") == _without(quick, "train.loss", "optim.lr",
                                                                                "prune.warmup")


def test_structured_cpu_is_quick_cpu_cutting_units_chosen_early_by_activation_scores():
    cut, quick = load_recipe("structured-cpu"), load_recipe("quick-cpu")
    assert _raw("structured-cpu")["base"] == "quick-cpu"
    assert cut.prune.structure == ["mlp", "heads"] and cut.prune.saliency == "global-wanda"
    assert cut.prune.warmup < cut.prune.final < quick.prune.final  # chosen early: most of the run recovers
    # activations on 32 windows of 512 training tokens, longer than quick-cpu's training windows
    assert cut.prune.calibration_windows == 32 and cut.prune.calibration_len == 512 > quick.data.seq_len
    changed = ("prune.structure", "prune.saliency", "prune.final", "prune.calibration_len")
    assert _without(cut, *changed) == _without(quick, *changed)  # quick-cpu's budget and recovery


@pytest.mark.parametrize("name, method", [("oneshot-wanda", "wanda"), ("oneshot-sparsegpt", "sparsegpt")])
def test_oneshot_recipes_prune_once_without_training(name, method):
    recipe, quick = load_recipe(name), load_recipe("quick-cpu")
    assert recipe.prune.method == method and recipe.prune.start == "dense"
    assert recipe.train.steps == 0
    assert (recipe.prune.calibration_windows, recipe.data.seq_len) == (32, 512)  # 32 windows of 512 tokens
    assert recipe.eval == quick.eval  # evaluated as quick-cpu, so the numbers sit next to it
    assert load_recipe(name, {"train.steps": 5}).train.steps == 5  # --steps N fine-tunes with the mask fixed


def test_oneshot_sparsegpt_is_oneshot_wanda_with_the_other_method():
    assert _without(load_recipe("oneshot-sparsegpt"), "prune.method") == _without(load_recipe("oneshot-wanda"),
                                                                                 "prune.method")


def test_gpt2_wikitext2_is_the_thesis_budget_with_quick_cpus_recovery():
    full, quick = load_recipe("gpt2-wikitext2"), load_recipe("quick-cpu")
    assert default_recipe("cuda")[0] == "gpt2-wikitext2"
    # The thesis's budget and AdamW settings (Tables 5.1 and 5.2): 3 epochs of 8 x 1024 tokens, lr 5e-5.
    assert (full.train.steps, full.train.epochs, full.train.batch_size, full.data.seq_len) == (None, 3, 8, None)
    assert (full.optim.lr, full.optim.weight_decay, full.optim.grad_clip) == (5e-5, 0.01, 1.0)
    assert (full.prune.sparsity, full.prune.method, full.prune.saliency) == (0.3, "dynamic", "taylor")
    assert full.eval.max_tokens is None  # the whole test split
    assert full.ta == quick.ta and full.train.loss == quick.train.loss == "kd"  # quick-cpu's TA step, distilled


def test_thesis_is_gpt2_wikitext2_with_the_thesis_ta_step_and_loss():
    thesis, full = load_recipe("thesis"), load_recipe("gpt2-wikitext2")
    assert thesis.ta.enabled and thesis.ta.lr is None  # eta_TA = the AdamW learning rate
    assert (thesis.ta.gamma, thesis.ta.beta) == (1.0, 0.5)
    assert thesis.train.loss == "ce"  # fine-tuned on the training text
    assert _without(thesis, "ta.lr", "train.loss") == _without(full, "ta.lr", "train.loss")
