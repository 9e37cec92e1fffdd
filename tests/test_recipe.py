"""Recipes: loading, flags, tables by sparsity, `base` inheritance, and bad recipes failing with one line
that says why. The shipped files themselves are tested in test_recipe_files.py."""

from __future__ import annotations

import pytest
import yaml

from compressor.errors import UsageError
from compressor.recipe import (builtin_recipes, by_sparsity, default_recipe, load_recipe, recipe_data,
                               recipe_to_yaml)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _one_line_error(source, match, overrides=None):
    with pytest.raises(UsageError, match=match) as info:
        load_recipe(source, overrides)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_default_recipe_is_a_builtin_file_chosen_by_device():
    # The default job is a file, not the schema: the full budget on a CUDA GPU, the quick one elsewhere.
    for device in ("cuda", "cuda:1", "cpu", "mps"):
        name, why = default_recipe(device)
        assert name in builtin_recipes() and why
        assert load_recipe(None, {"device": device}) == load_recipe(name, {"device": device})
    assert default_recipe("cuda")[0] != default_recipe("cpu")[0]
    assert load_recipe(None) == load_recipe(default_recipe()[0])
    # whole units off a GPU: the structured recipe, its units as the flag says; on a GPU the full budget as ever
    assert default_recipe("cpu", structure=True)[0] == "structured-cpu"
    assert default_recipe("cuda", structure=True)[0] == default_recipe("cuda")[0]
    mlp = load_recipe(None, {"device": "cpu", "prune.structure": ["mlp"]})
    assert mlp == load_recipe("structured-cpu", {"device": "cpu", "prune.structure": ["mlp"]})
    assert mlp.prune.structure == ["mlp"] and mlp.prune.saliency == "global-wanda"


def test_overrides_win():
    recipe = load_recipe("quick-cpu", {"prune.sparsity": 0.5, "train.steps": 7, "data.seq_len": None})
    assert recipe.prune.sparsity == 0.5 and recipe.train.steps == 7
    assert recipe.data.seq_len == load_recipe("quick-cpu").data.seq_len  # a flag not given (None) changes nothing


def test_tables_by_target_sparsity_give_the_values_of_the_target(tmp_path):
    table = {0.3: 1e-4, 0.5: 2e-4}
    lrs = [load_recipe("thesis", {"optim.lr": table, "prune.sparsity": s}).optim.lr for s in (0.1, 0.3, 0.4, 0.5, 0.9)]
    assert lrs == [1e-4, 1e-4, pytest.approx(1.5e-4), 2e-4, 2e-4]  # the ends outside, linear between
    # A built-in recipe's tables give, at each target, the table's value there.
    raw = recipe_data("quick-cpu")
    for s in (0.1, 0.3, 0.4, 0.45, 0.5, 0.7):
        recipe = load_recipe("quick-cpu", {"prune.sparsity": s})
        for section, key in (("optim", "lr"), ("prune", "warmup")):
            value = raw[section][key]
            expected = by_sparsity(value, s, f"{section}.{key}") if isinstance(value, dict) else value
            assert getattr(getattr(recipe, section), key) == pytest.approx(expected)
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
    _one_line_error(path, message)


def test_unknown_recipe_name_lists_builtins():
    message = _one_line_error("no-such-recipe", "not found")
    assert all(name in message for name in builtin_recipes())


# ----------------------------------------------------------------------------------------------- base


def test_a_user_recipe_builds_on_a_builtin(tmp_path):
    path = _write(tmp_path / "mine.yaml", "base: quick-cpu\nprune: {sparsity: 0.5}\ntrain: {steps: 7}\n")
    recipe = load_recipe(path)
    same = load_recipe("quick-cpu", {"prune.sparsity": 0.5, "train.steps": 7})  # tables read at the child's sparsity
    assert recipe.model_dump(exclude={"name", "description"}) == same.model_dump(exclude={"name", "description"})
    # Its name and description are its own, never the base's: without them, the file's stem and the base.
    assert (recipe.name, recipe.description) == ("mine", "based on quick-cpu")
    named = load_recipe(_write(tmp_path / "named.yaml", "base: quick-cpu\nname: job\ndescription: my job\n"))
    assert (named.name, named.description) == ("job", "my job")
    # What runs and is written as OUT/recipe.yaml is the whole recipe, without base; it loads back the same.
    text = recipe_to_yaml(recipe)
    assert "base" not in yaml.safe_load(text)
    assert load_recipe(_write(tmp_path / "ran.yaml", text)) == recipe
    # Flags still win over both.
    assert load_recipe(path, {"train.steps": 3}).train.steps == 3


def test_base_is_merged_section_by_section_and_lists_and_tables_are_replaced(tmp_path):
    _write(tmp_path / "parent.yaml", "prune: {sparsity: 0.5, pattern: '2:4', prune_every: 4}\n"
                                     "optim: {lr: {0.3: 1.0e-4, 0.5: 2.0e-4}, weight_decay: 0.0}\n"
                                     "export: {quantize: [int8, int4], gguf: [q8_0, f16]}\n"
                                     "train: {steps: 50}\n")
    child = load_recipe(_write(tmp_path / "child.yaml", "base: parent.yaml\n"
                                                        "prune: {prune_every: 8}\n"
                                                        "optim: {lr: {0.5: 3.0e-4}}\n"
                                                        "export: {gguf: [f16]}\n"))
    assert (child.prune.sparsity, child.prune.pattern, child.prune.prune_every) == (0.5, "2:4", 8)
    assert child.optim.weight_decay == 0.0 and child.train.steps == 50
    assert child.export.gguf == ["f16"] and child.export.quantize == ["int8", "int4"]  # a list is one value
    # A table by sparsity is one value too: the child's replaces the base's (0.3 would be 1e-4 if merged).
    assert load_recipe(tmp_path / "child.yaml", {"prune.sparsity": 0.3, "prune.pattern": "unstructured"}
                       ).optim.lr == 3e-4
    # A scalar replaces a table, and null replaces a value.
    nulls = load_recipe(_write(tmp_path / "nulls.yaml", "base: parent.yaml\noptim: {lr: 1.0e-3}\n"
                                                        "train: {steps: null}\n"))
    assert nulls.optim.lr == 1e-3 and nulls.train.steps is None


def test_base_files_are_relative_to_the_recipe_and_chain(tmp_path, monkeypatch):
    _write(tmp_path / "shared" / "team.yaml", "base: quick-cpu\nseed: 7\n")
    _write(tmp_path / "jobs" / "mine.yaml", "base: ../shared/team.yaml\ntrain: {steps: 9}\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative to the recipe, not to the working directory
    recipe = load_recipe(tmp_path / "jobs" / "mine.yaml")
    assert (recipe.seed, recipe.train.steps, recipe.name) == (7, 9, "mine")
    assert recipe.train.loss == load_recipe("quick-cpu").train.loss
    # A file of that name next to the recipe wins over a built-in of the same name.
    _write(tmp_path / "jobs" / "quick-cpu", "seed: 3\n")
    assert load_recipe(_write(tmp_path / "jobs" / "local.yaml", "base: quick-cpu\n")).seed == 3


def test_base_cycles_are_rejected_in_one_line(tmp_path):
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    message = _one_line_error(tmp_path / "a.yaml", "cycle")
    assert message.index("a.yaml") < message.index("b.yaml") < message.rindex("a.yaml")
    _one_line_error(_write(tmp_path / "self.yaml", "base: self.yaml\n"), r"cycle: .*self.yaml -> .*self.yaml")


@pytest.mark.parametrize("base", ["no-such-recipe", "missing.yaml"])
def test_unknown_base_lists_the_builtins_in_one_line(tmp_path, base):
    message = _one_line_error(_write(tmp_path / "r.yaml", f"base: {base}\n"), f"base '{base}' not found")
    assert "r.yaml" in message and all(name in message for name in builtin_recipes())


@pytest.mark.parametrize("text", ["base: [quick-cpu]\n", "base:\n", "base: 3\n"])
def test_base_must_be_a_name(tmp_path, text):
    _one_line_error(_write(tmp_path / "r.yaml", text), "base must be a built-in recipe name or a YAML file")


def test_unknown_keys_are_still_rejected_and_name_their_file(tmp_path):
    child = _write(tmp_path / "child.yaml", "base: quick-cpu\nprune: {sparsty: 0.5}\n")
    message = _one_line_error(child, "prune.sparsty: unknown key")
    assert message.startswith(str(child))
    _one_line_error(_write(tmp_path / "nested.yaml", "base: quick-cpu\nprune: {base: quick-cpu}\n"),
                    "prune.base: unknown key")
    # A bad key in a base is reported against the base's file, not the recipe that names it.
    parent = _write(tmp_path / "parent.yaml", "base: quick-cpu\ntrain: {stepz: 5}\n")
    message = _one_line_error(_write(tmp_path / "top.yaml", "base: parent.yaml\nseed: 1\n"), "train.stepz: unknown key")
    assert message.startswith(str(parent))
    message = _one_line_error(_write(tmp_path / "top2.yaml", "base: parent.yaml\ntrain: {stepz: 6}\n"), "unknown key")
    assert message.startswith(str(tmp_path / "top2.yaml"))  # the recipe's own key first
    # ... and a bad flag against the recipe given, even where a base set that key.
    clean = _write(tmp_path / "clean.yaml", "base: quick-cpu\n")
    assert _one_line_error(clean, "prune.sparsity", {"prune.sparsity": "high"}).startswith(str(clean))
    _one_line_error(_write(tmp_path / "broken.yaml", "optim: [1, 2\n"), "broken.yaml is not valid YAML")
    _one_line_error(_write(tmp_path / "via.yaml", "base: broken.yaml\n"), "broken.yaml is not valid YAML")
