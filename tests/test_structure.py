"""Structured pruning: whole MLP channels and query heads, masked while training, cut out at the end."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor import compress, load_recipe, structure
from compressor.models import prunable_weights
from compressor.pruner import Pruner
from compressor.recipe import PruneConfig
from compressor.structure import cut, find_groups, unit_masks, unit_scores

from .conftest import build_model, run_cli, save_tiny



def _expected_zeros(config, widths: dict) -> int:
    """Weights the cut removed, from the widths alone: 3 (2 for GPT-2) per MLP channel per hidden
    unit, and a query head's rows of q_proj and columns of o_proj."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or text.n_embd
    layers = getattr(text, "num_hidden_layers", None) or text.n_layer
    zeros = 0
    if "mlp" in widths:
        per_channel = 2 if hasattr(text, "n_inner") else 3
        zeros += layers * per_channel * hidden * (widths["mlp"]["before"] - widths["mlp"]["after"])
    if "heads" in widths:
        zeros += layers * 2 * hidden * text.head_dim * (widths["heads"]["before"] - widths["heads"]["after"])
    return zeros


@pytest.mark.parametrize("kind,units", [("llama", "mlp,heads"), ("gemma3", "mlp,heads"), ("gpt2", "mlp")])
def test_a_structured_run_removes_exactly_the_counted_weights_and_saves_a_smaller_model(
        kind, units, tmp_path, tokenizer, data_dir, quick_recipe_file):
    folder = save_tiny(tmp_path / kind, kind, tokenizer, init_range=0.2)
    recipe = load_recipe(quick_recipe_file, {"data.dataset": str(data_dir), "prune.sparsity": 0.4,
                                             "prune.structure": units.split(",")})
    result = compress(str(folder), recipe, tmp_path / "out")
    report = result.report
    structure, sparsity = report["structure"], report["sparsity"]
    params = structure["parameters"]
    assert f"{params['before']:,} -> {params['after']:,} parameters" in result.table  # the text output says it
    assert "Cut to a smaller model" in (tmp_path / "out" / "report.md").read_text()
    assert not (tmp_path / "out" / "sparse").exists()  # no zeros left to store sparsely
    dense_config = json.loads((folder / "config.json").read_text())
    from transformers import AutoConfig

    assert sparsity["prunable_zeros"] == _expected_zeros(AutoConfig.from_pretrained(folder), structure["widths"])
    # the target from below, by less than one slice (one more unit in every layer of the largest kind)
    assert 0.3 < sparsity["prunable_sparsity"] <= 0.4
    assert any(w["after"] < w["before"] for w in structure["widths"].values())
    smaller = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")  # plain transformers, no remote code
    assert sum(p.numel() for p in smaller.parameters()) == structure["parameters"]["after"]
    assert structure["parameters"]["after"] < structure["parameters"]["before"]
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    if kind == "gpt2":
        assert config["n_inner"] == structure["widths"]["mlp"]["after"]
    else:
        assert config["intermediate_size"] == structure["widths"]["mlp"]["after"]
        assert config["head_dim"] == dense_config.get("head_dim", 16)  # the width of a head is kept
    # The saved model is the one evaluated: its perplexity on the same tokens is the report's.
    from compressor.evaluate import perplexity
    from compressor.data import load_texts, tokenize

    ids = tokenize(tokenizer, load_texts(str(data_dir)).texts["test"])
    again = perplexity(smaller, ids, 32, max_tokens=600, batch_size=4)
    # fp32 evaluation of the same weights in the same order of operations: equal to rounding.
    assert again.ppl == pytest.approx(report["perplexity"]["pruned"]["ppl"], rel=1e-5)


@pytest.mark.parametrize("kind,units", [("llama", ("mlp", "heads")), ("gemma3", ("mlp", "heads")), ("gpt2", ("mlp",))])
def test_the_cut_model_computes_what_the_masked_model_computes(kind, units):
    model = build_model(kind, 97, init_range=0.2).double()
    modules = prunable_weights(model)
    groups = find_groups(model, units, modules)
    scores = {name: torch.rand(m.weight.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
              for i, (name, m) in enumerate(modules.items())}
    removed = {"mlp": 50, "heads": 1}
    units_ = [unit_scores(g, scores, modules) for g in groups]
    masks = unit_masks(groups, units_, modules, {k: v for k, v in removed.items() if k in units})
    ids = torch.randint(97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, module in modules.items():
            module.weight.mul_(masks[name])
        masked = model(input_ids=ids).logits
        smaller = cut(model, groups, masks, modules).double()
        logits = smaller(input_ids=ids).logits
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in model.parameters())
    # float64, the same products without the zeroed terms: only the order of sums differs (~1e-16 relative).
    torch.testing.assert_close(logits, masked, rtol=0, atol=1e-10)


def test_slices_go_cheapest_first_within_the_budget_and_keep_one_unit():
    model = build_model("llama", 97)
    modules = prunable_weights(model)
    groups = find_groups(model, ("mlp", "heads"), modules)
    # A head slice is 2 layers x 2 kv groups x (16 rows of q + 16 columns of o) x 64 = 8192 weights; an MLP slice
    # is 32 channels x 2 layers x 3 x 64 = 12288 weights (the 128 channels divide by 32).
    mlp_cost = 2.0  # per weight, against 1 for the heads
    scores = {name: torch.full_like(m.weight, mlp_cost if "mlp" in name else 1.0) for name, m in modules.items()}

    def plan_removal(groups, scores, modules, budget):
        return structure.plan_removal(groups, [unit_scores(g, scores, modules) for g in groups], modules, budget)

    assert plan_removal(groups, scores, modules, 8191) == {"mlp": 0, "heads": 0}
    assert plan_removal(groups, scores, modules, 12288) == {"mlp": 0, "heads": 1}  # the cheaper first
    assert plan_removal(groups, scores, modules, 12288 + 8192) == {"mlp": 32, "heads": 1}
    scores = {name: s / mlp_cost if "mlp" in name else s * 3 for name, s in scores.items()}  # now the MLP is cheaper
    assert plan_removal(groups, scores, modules, 12288) == {"mlp": 32, "heads": 0}
    everything = sum(m.weight.numel() for m in modules.values())
    assert plan_removal(groups, scores, modules, everything) == {"mlp": 96, "heads": 1}  # one slice of each stays


def test_kinds_trade_by_the_scores_of_their_output_weights():
    model = build_model("llama", 97)
    total = sum(m.weight.numel() for m in prunable_weights(model).values())
    config = PruneConfig(sparsity=12288 / total, structure=["mlp", "heads"], warmup=0.0, final=1.0, prune_every=1)
    pruner = Pruner(config, 10).prepare(model)
    # Per weight over all of a unit's weights a head slice is the cheaper (q rows 0, o columns 1: 0.5, against
    # (1 + 1 + 0.3) / 3 for the channels); over the weights that carry the output, the MLP slice is
    # (down columns 0.3 over 3 x 4096 weights: 0.1, against 4096 o columns of 1 over 8192 weights: 0.5).
    cost = {"q_proj": 0.0, "o_proj": 1.0, "down_proj": 0.3}
    for name, weight in pruner.weights.items():
        pruner.scores[name] = torch.full_like(weight, cost.get(name.split(".")[-1], 1.0))
    modules, groups = pruner.modules, pruner.groups
    units = [unit_scores(g, pruner.scores, modules) for g in groups]
    assert structure.plan_removal(groups, units, modules, 12288) == {"mlp": 0, "heads": 1}
    assert pruner.step(10, [1.0] * 20)["units"] == {"mlp": 32, "heads": 0}


def test_regrowth_brings_a_unit_back():
    model = build_model("llama", 97)
    config = PruneConfig(sparsity=0.2, structure=["mlp"], warmup=0.0, tau=0.2, final=1.0, prune_every=1)
    pruner = Pruner(config, 10).prepare(model)
    gate = "model.layers.0.mlp.gate_proj"
    for name, weight in pruner.weights.items():
        pruner.scores[name] = torch.ones_like(weight)
    pruner.scores[gate][7] = 0.0  # channel 7 of layer 0: the cheapest of its layer
    first = pruner.step(9, [1.0] * 20)  # the schedule at 0.9 of the run: 0.198, room for one slice of 32 channels
    assert first["units"] == {"mlp": 32} and not pruner.masks[gate][7].any()
    pruner.scores[gate][7] = 100.0  # it became important; channel 40 is now the cheapest
    pruner.scores[gate][40] = 0.0
    record = pruner.step(10, [1.0] * 20)
    assert pruner.masks[gate][7].all() and not pruner.masks[gate][40].any()
    assert record["regrown"] == record["pruned"] > 0  # one channel's weights back, another's out


def test_resume_of_a_structured_run_equals_an_uninterrupted_one(tmp_path, tokenizer, data_dir, quick_recipe_file):
    from compressor.train import Interrupted
    from safetensors.torch import load_file

    folder = save_tiny(tmp_path / "llama", "llama", tokenizer, init_range=0.2)
    recipe = load_recipe(quick_recipe_file, {"data.dataset": str(data_dir), "prune.structure": ["mlp", "heads"],
                                             "train.checkpoint_every": 0})
    compress(str(folder), recipe, tmp_path / "whole")
    polls = iter(range(100))
    with pytest.raises(Interrupted):
        compress(str(folder), recipe, tmp_path / "cut", stop=lambda: next(polls) == 4)
    compress(str(folder), recipe, tmp_path / "cut", resume=True)
    a, b = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_unit_the_architecture_cannot_express_is_a_one_line_error_before_training(gpt2_dir, data_dir, tmp_path):
    result = run_cli("compress", gpt2_dir, "--structure", "heads", "--dataset", data_dir, "--out", tmp_path / "o",
                     "--steps", "4", "--no-onnx", "--device", "cpu")
    assert "recipe structured-cpu" in result.output  # without --recipe, off a GPU: the structured default
    assert result.exit_code != 0 and "--structure heads" in result.output and "use --structure mlp" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()
    assert "dense perplexity" not in result.output  # refused before the dense evaluation, not after training


def test_structure_refuses_one_shot_methods_and_n_m_patterns():
    for overrides in ({"prune.method": "wanda"}, {"prune.start": "sparsegpt"},
                      {"prune.pattern": "2:4", "prune.sparsity": 0.5}):
        with pytest.raises(Exception, match="structured pruning"):
            load_recipe(None, {"prune.structure": ["mlp"], **overrides})
    result = run_cli("compress", "x", "--structure", "mlp,layers")
    assert result.exit_code == 2 and "structured units" in result.output


def test_the_cut_model_exports_to_onnx_and_gguf_and_generates_the_same_text(tmp_path, tokenizer, data_dir,
                                                                             quick_recipe_file):
    folder = save_tiny(tmp_path / "llama", "llama", tokenizer, init_range=0.2)
    out = tmp_path / "out"
    result = run_cli("compress", folder, "--recipe", quick_recipe_file, "--dataset", data_dir, "--out", out,
                     "--sparsity", 0.4, "--structure", "mlp,heads", "--onnx", "--quantize", "int8,int4",
                     "--gguf", "f16", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    exported = report["export"]
    assert exported["onnx"]["logits"]["passed"]  # the parity check against PyTorch, on the cut model
    assert {"int8", "int4"} <= exported.keys()  # int4 blocks of 32 fit the cut widths (multiples of 32)
    # Read back by transformers with the cut shapes; f16 weights of a random model flip only near-ties
    # (measured 0.998 agreement), far from the 0.9 a wrong shape or layout would miss by.
    assert exported["gguf"]["f16"]["top1_agreement"] > 0.9
    dense_onnx_bytes = 4 * sum(p.numel() for p in build_model("llama", len(tokenizer)).parameters())
    assert exported["onnx"]["bytes"] < dense_onnx_bytes  # the graph holds the smaller matrices
    texts = [run_cli("generate", out / name, "--prompt", "The history of", "--max-new-tokens", 12, "--ignore-eos")
             for name in ("model", "onnx")]
    assert all(t.exit_code == 0 for t in texts) and texts[0].stdout == texts[1].stdout and texts[0].stdout.strip()
    # `tapc eval --reference` of the cut model against the original dense one: the run's own drift figures
    drift = run_cli("eval", out / "model", "--reference", folder, "--dataset", data_dir, "--seq-len", 32,
                    "--eval-tokens", 600, "--json")
    assert drift.exit_code == 0, drift.output
    measured = json.loads(drift.stdout[drift.stdout.index("{"):])["perplexity"]
    # the same fp32 computation as the run's evaluation, batched alike: equal up to summation order
    assert measured["kl"] == pytest.approx(report["perplexity"]["pruned"]["kl"], rel=1e-4)


def test_a_cut_model_from_a_gguf_writes_its_own_widths_into_the_copied_metadata(tmp_path, tokenizer, data_dir,
                                                                                quick_recipe_file):
    """A run from a .gguf copies that file's metadata into its GGUF exports; the cut widths must replace
    the source's, or llama.cpp and transformers would read the smaller tensors with the old shapes."""
    folder = save_tiny(tmp_path / "llama", "llama", tokenizer, init_range=0.2)
    assert run_cli("export", folder, "--gguf", "f16", "--out", tmp_path / "dense").exit_code == 0
    source = tmp_path / "dense" / "gguf" / "model-f16.gguf"
    # heads only: one query head of each key-value group goes (a slice is 11% of the weights), so the head
    # width differs from hidden / heads and the copied file needs key_length too
    result = run_cli("compress", source, "--recipe", quick_recipe_file, "--dataset", data_dir, "--out",
                     tmp_path / "out", "--sparsity", 0.15, "--structure", "heads", "--gguf", "f16", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["structure"]["widths"]["heads"] == {"before": 4, "after": 2}
    written = report["export"]["gguf"]["f16"]
    assert written["metadata"] == f"copied from {source.name}"
    # Read back by transformers with the cut shapes (else it refuses the file); f16 weights of a random model
    # flip only near-ties (measured 0.998), far above what a wrong shape or head layout gives.
    assert written["top1_agreement"] > 0.9


def test_the_structured_recipe_cuts_units_it_chose_early_by_their_activations(tmp_path, tokenizer, data_dir):
    folder = save_tiny(tmp_path / "llama", "llama", tokenizer, init_range=0.2)
    small = tmp_path / "small.yaml"  # the built-in recipe at a tiny model's scale
    small.write_text("base: structured-cpu\ntrain: {steps: 20, eval_every: 10, val_batches: 1}\n"
                     "prune: {calibration_len: 64}\n"  # within the tiny model's context, longer than its windows
                     "data: {seq_len: 32}\neval: {seq_len: 32, max_tokens: 600}\nexport: {onnx: false}\n")
    result = run_cli("compress", folder, "--recipe", small, "--dataset", data_dir, "--out", tmp_path / "out",
                     "--sparsity", 0.4, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["recipe"]["prune"]["saliency"] == "global-wanda"  # scored by |w| * ||x||, not gradients
    assert "activations on 32 calibration windows of 64 tokens" in (tmp_path / "out" / "report.md").read_text()
    assert report["train"]["mask_updates"] == 1  # every unit chosen at once, at step 4 of 20 (final 0.2)
    widths = report["structure"]["widths"]
    assert widths["mlp"]["after"] < widths["mlp"]["before"]
    smaller = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    assert sum(p.numel() for p in smaller.parameters()) == report["structure"]["parameters"]["after"]
