"""The memory bill before loading: counts from the config, the stop, --dry-run."""

from __future__ import annotations

import json

import pytest

from compressor import compress, load_recipe, memory
from compressor.errors import UsageError
from compressor.memory import estimate_for, meta_model
from compressor.models import load_model, prunable_weights
from safetensors.torch import load_file

from .conftest import run_cli


def test_estimate_counts_the_real_model_from_its_config_alone(model_dir, quick_recipe_file):
    meta = meta_model(str(model_dir))
    real = load_model(str(model_dir)).model
    recipe = load_recipe(quick_recipe_file)
    est = estimate_for(meta, recipe)
    assert est.params == sum(p.numel() for p in real.parameters())
    assert est.prunable == sum(m.weight.numel() for m in prunable_weights(real).values())
    assert est.train["weights"] == 4 * est.params and est.train["adam"] == 8 * est.params
    assert est.train["teacher"] == 0
    kd = estimate_for(meta, load_recipe(quick_recipe_file, {"train.loss": "kd"}))
    assert kd.train["teacher"] == 4 * est.params and sum(kd.train.values()) > sum(est.train.values())
    assert kd.state_bytes_per_param == pytest.approx(est.state_bytes_per_param + 4)
    bigger = estimate_for(meta, load_recipe(quick_recipe_file, {"train.batch_size": 8}))
    assert bigger.train["activations"] == 4 * est.train["activations"]  # 8 windows instead of 2
    ddp = estimate_for(meta, recipe, world=2)
    assert ddp.train["activations"] == est.train["activations"] // 2 and ddp.train["adam"] == est.train["adam"]
    fsdp = estimate_for(meta, load_recipe(quick_recipe_file, {"train.parallel": "fsdp"}), world=2)
    assert fsdp.train["adam"] == est.train["adam"] // 2 and fsdp.train["gathered_blocks"] > 0
    assert fsdp.state_bytes_per_param == pytest.approx(est.state_bytes_per_param / 2, rel=1e-3)


def test_calibration_is_counted_when_a_run_calibrates(model_dir, quick_recipe_file):
    meta = meta_model(str(model_dir))
    assert estimate_for(meta, load_recipe(quick_recipe_file)).calibration == {}  # magnitude/Taylor: none
    wanda = estimate_for(meta, load_recipe(quick_recipe_file, {"prune.saliency": "global-wanda"}))
    longer = estimate_for(meta, load_recipe(quick_recipe_file, {"prune.saliency": "global-wanda",
                                                                 "prune.calibration_len": 4096}))
    assert longer.calibration["logits"] == wanda.calibration["logits"] * 4096 // 32  # the recipe's 32-token windows
    assert sum(wanda.calibration.values()) < sum(wanda.train.values())  # windows as the training ones: below
    sparsegpt = estimate_for(meta, load_recipe(quick_recipe_file, {"prune.method": "sparsegpt"}))
    assert sparsegpt.calibration["hessians"] > 0 and sparsegpt.calibration["hidden_states"] > 0
    assert "hessians" not in estimate_for(meta, load_recipe(quick_recipe_file, {"prune.method": "wanda"})).calibration
    assert longer.peak == sum(longer.calibration.values()) > sum(longer.train.values())


def test_a_run_that_cannot_fit_stops_before_loading(gpt2_dir, data_dir, quick_recipe_file, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1_000_000)
    result = run_cli("compress", gpt2_dir, "--recipe", quick_recipe_file, "--dataset", data_dir,
                     "--out", tmp_path / "out")
    assert result.exit_code == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "GB per process" in line and "--seq-len" in line and "TAPC_IGNORE_MEMORY" in line
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("TAPC_IGNORE_MEMORY", "1")
    recipe = load_recipe(quick_recipe_file, {"data.dataset": str(data_dir)})
    report = compress(str(gpt2_dir), recipe, tmp_path / "out").report
    assert report["memory_estimate"]["state_bytes_per_param"] > 16
    with pytest.raises(UsageError):  # and the same stop in the library
        monkeypatch.delenv("TAPC_IGNORE_MEMORY")
        compress(str(gpt2_dir), recipe, tmp_path / "again")


def test_dry_run_times_steps_and_writes_nothing(gpt2_dir, data_dir, quick_recipe_file, tmp_path):
    out = tmp_path / "out"
    result = run_cli("compress", gpt2_dir, "--recipe", quick_recipe_file, "--dataset", data_dir, "--out", out,
                     "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["dry_run"] and plan["steps"] == 12 and len(plan["timed_steps"]) == 3
    assert plan["seconds_per_step"] > 0 and plan["memory_estimate"]["peak_bytes"] > 0
    assert not out.exists() and not (tmp_path / "out.checkpoint").exists()
    text = run_cli("compress", gpt2_dir, "--recipe", quick_recipe_file, "--dataset", data_dir, "--out", out,
                   "--dry-run")
    assert text.exit_code == 0 and "time per step" in text.stdout and "memory estimate" in text.stderr


def test_a_batch_that_does_not_fit_runs_as_micro_batches_with_the_same_result(no_dropout_model, data_dir,
                                                                              quick_recipe_file, tmp_path,
                                                                              monkeypatch):
    gpt2_dir = no_dropout_model  # dropout would draw other random numbers for two half batches
    recipe = load_recipe(quick_recipe_file, {"data.dataset": str(data_dir), "train.batch_size": 4})
    meta = meta_model(str(gpt2_dir))
    whole = estimate_for(meta, recipe).peak
    halves = estimate_for(meta, load_recipe(quick_recipe_file, {"train.batch_size": 4,
                                                                "train.micro_batch": 2})).peak
    assert halves < whole
    fits = compress(str(gpt2_dir), recipe, tmp_path / "fits").report
    monkeypatch.setattr(memory, "available_bytes", lambda device: (halves + whole) // 2)
    split = compress(str(gpt2_dir), recipe, tmp_path / "split").report
    assert recipe.train.micro_batch is None  # the caller's recipe is left as it was
    assert fits["memory_estimate"]["split"] is None and fits["recipe"]["train"]["micro_batch"] is None
    assert "2 micro-batches of 2" in split["memory_estimate"]["split"]
    assert split["recipe"]["train"]["micro_batch"] == 2
    # The same step in another order of sums: the mean of two half-batch means is the batch mean, exactly in
    # real arithmetic, within fp32 rounding (~1e-7 relative a step, grown over 12 steps) on any CPU.
    a, b = (json.loads((tmp_path / run / "training_log.json").read_text())["loss"] for run in ("fits", "split"))
    assert a == pytest.approx(b, rel=1e-4)
    masks = [{k: v == 0 for k, v in load_file(tmp_path / run / "model" / "model.safetensors").items()}
             for run in ("fits", "split")]
    differ = sum(int((masks[0][k] != masks[1][k]).sum()) for k in masks[0])
    # Same masks; a weight whose score ties the threshold within rounding is the only way one can differ.
    assert differ <= 1e-4 * fits["sparsity"]["prunable_params"], differ


def test_without_a_recipe_the_cpu_gets_the_quick_one_and_the_report_says_so(tmp_path, data_dir, tokenizer):
    from compressor.recipe import default_recipe

    from .conftest import build_model

    assert default_recipe("cpu")[0] == "quick-cpu" and default_recipe("cuda:0")[0] == "gpt2-wikitext2"
    model = build_model("llama", len(tokenizer))
    model.config.max_position_embeddings = 1024  # quick-cpu evaluates 512-token windows
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    result = run_cli("compress", tmp_path / "m", "--sparsity", "0.3", "--dataset", data_dir, "--device", "cpu",
                     "--steps", "2", "--eval-tokens", "600", "--no-onnx", "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    assert "recipe quick-cpu (the device is cpu: the quick CPU budget" in result.stderr
    report = json.loads(result.stdout)
    assert report["recipe"]["name"] == "quick-cpu" and report["recipe_choice"].startswith("quick-cpu: the device is cpu")


@pytest.mark.parametrize("version", [1, 2])
def test_a_cgroup_limit_is_the_memory_there_is(tmp_path, version):
    """A container or a CI job's memory limit, not the host's free RAM that /proc/meminfo shows."""
    from compressor.memory import cgroup_room

    membership = tmp_path / "cgroup"
    folder = tmp_path / ("memory/job" if version == 1 else "job")
    folder.mkdir(parents=True)
    names = ("memory.limit_in_bytes", "memory.usage_in_bytes") if version == 1 else ("memory.max", "memory.current")
    membership.write_text("4:memory:/job\n1:cpu:/job\n" if version == 1 else "0::/job\n")
    (folder / names[0]).write_text(f"{7 * 2**30}\n")
    (folder / names[1]).write_text(f"{2**30}\n")
    assert cgroup_room(tmp_path, membership) == 6 * 2**30
    (folder / names[0]).write_text("max\n" if version == 2 else "9223372036854771712\n")  # no limit
    assert cgroup_room(tmp_path, membership) is None
