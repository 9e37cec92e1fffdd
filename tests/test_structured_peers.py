"""The structured peers' benchmark: its unit choices and layer removal, on tiny models from configs."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import structured_peers as peers
from compressor.calibration import decoder_layers
from compressor.models import prunable_weights

from .conftest import SHARED_DATA, build_model


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_dropping_a_layer_computes_what_skipping_it_computes(kind):
    model = build_model(kind, 97, init_range=0.2).double()
    ids = torch.randint(97, (2, 12), generator=torch.Generator().manual_seed(0))
    smaller = peers.drop_layers(model, {0}).double()
    skip = decoder_layers(model)[0].register_forward_hook(
        lambda m, args, kwargs, out: (args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        skipped = model(input_ids=ids).logits
        skip.remove()
        whole = model(input_ids=ids).logits
        logits = smaller(input_ids=ids).logits
    assert smaller.config.num_hidden_layers == 1
    assert not torch.allclose(whole, skipped)  # the layer did something
    # float64, the same operations on the same values: equal to rounding
    torch.testing.assert_close(logits, skipped, rtol=0, atol=1e-10)


def test_an_mlp_channel_that_never_fires_is_the_first_minitron_removes():
    model = build_model("llama", 97, init_range=0.2)
    for layer in decoder_layers(model):
        layer.mlp.gate_proj.weight.data[5] = 0  # silu(0) * up = 0: channel 5 never reaches down_proj
    calibration = torch.randint(97, (3, 16), generator=torch.Generator().manual_seed(0))
    units = peers.minitron_units(model, calibration)
    modules, groups = peers._groups(model)
    for group, score in zip(groups, units):
        if group.kind == "mlp":
            assert score.flatten()[5] == 0 and (score.flatten()[torch.arange(128) != 5] > 0).all()
    smaller = peers._cut_by(model, units, 0.3)
    removed = 1 - sum(m.weight.numel() for m in prunable_weights(smaller).values()) / sum(
        m.weight.numel() for m in modules.values())
    # tapc's plan: within the budget, short of it by less than one slice (an MLP slice: 32 channels of 3 x 64
    # weights in 2 layers, 9.4% of the 131,072 projection weights)
    assert 0.3 - 0.094 < removed <= 0.3
    assert smaller.config.intermediate_size % 32 == 0


def test_taylor_scores_sum_weight_times_gradient_over_each_unit():
    model = build_model("llama", 97, init_range=0.2)
    calibration = torch.randint(97, (2, 16), generator=torch.Generator().manual_seed(0))
    units = peers.taylor_units(model, calibration)
    for window in calibration:
        model(input_ids=window[None], labels=window[None]).loss.backward()
    mlp = decoder_layers(model)[0].mlp
    expected = sum((w.weight * w.weight.grad).abs().sum(dim) for w, dim in
                   ((mlp.gate_proj, 1), (mlp.up_proj, 1), (mlp.down_proj, 0)))
    # the same gradients; float32 sums of at most 192 positive terms against a float64 sum: <= 192 x 6e-8
    torch.testing.assert_close(units[0].flatten().float(), expected, rtol=1e-4, atol=0)


@pytest.mark.slow
def test_quick_benchmark_runs_every_method_and_resumes(tmp_path, capsys):
    args = ["--quick", "--dataset", str(SHARED_DATA), "--out", str(tmp_path), "--sparsity", "0.5"]
    peers.main(args)
    runs = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")}
    assert set(runs) == {f"{m}-50-4steps-seed0" for m in peers.METHODS}  # 4 steps, not 120: the id says so
    assert runs["shortgpt-50-4steps-seed0"]["shape"]["layers"] == 1
    assert all(0.3 < r["removed"] <= 0.5 and r["kl"] > 0 and r["chat_kl"] > 0 for r in runs.values())
    capsys.readouterr()
    peers.main(args)  # every run is on disk: nothing runs again
    assert "seed0:" not in capsys.readouterr().out
    assert "| 50% | 4 | tapc | 1 |" in (tmp_path / "results.md").read_text()


def test_a_prune_variant_changes_tapcs_recipe_over_the_benchmarks_own_fields_and_names_its_runs():
    settings = peers.Settings(seed=1, steps=peers.STEPS, seq_len=256)
    variant = {"structure": ["mlp"], "score_loss": "sampled"}
    plain, changed = peers.recipe(settings, 0.3, "tapc"), peers.recipe(settings, 0.3, "tapc", variant)
    assert plain.prune.structure == ["mlp", "heads"] and plain.prune.score_loss == "ce"
    assert changed.prune.structure == ["mlp"] and changed.prune.score_loss == "sampled"
    assert changed.prune.sparsity == 0.3 and changed.seed == 1
    assert peers.run_id("tapc", 0.3, 1, variant) == "tapc-structuremlp-score_losssampled-30-seed1"


def test_every_tapc_variant_with_seeds_gets_a_verdict_against_the_peers_at_its_budget():
    def run(method, seed, kl, chat_kl, steps=120):
        return {"method": method, "label": method, "sparsity": 0.2, "seed": seed, "steps": steps, "removed": 0.19,
                "parameters": 1, "shape": {"layers": 2, "intermediate_size": 8, "heads": 2}, "ppl": 40.0,
                "kl": kl, "top1": 0.6, "chat_kl": chat_kl}
    runs = [run("tapc-finalx", s, 0.40 + 0.01 * s, 1.2) for s in range(3)]  # mean 0.41, SD 0.01
    runs += [run("taylor", s, 0.46 + 0.01 * s, 1.2 + 0.01 * s) for s in range(3)]  # 0.47: 0.06 above
    runs += [run("minitron", s, 0.42, 1.1) for s in range(2)]  # 0.42: 0.01 above, within 2 SDs; chat: no spread
    runs += [run("tapc", 0, 0.40, 1.2), run("tapc-finalx", 0, 0.40, 1.2, steps=480)]  # one seed: no verdict
    lines = peers.verdicts(peers.table(runs)[1])
    assert lines == ["- 20%, 120 steps, tapc-finalx against taylor: kl -0.060 (2 SDs 0.020): lower; "
                     "chat kl -0.010 (2 SDs 0.020): within 2 seed SDs",
                     "- 20%, 120 steps, tapc-finalx against minitron: kl -0.010 (2 SDs 0.020): within 2 seed SDs; "
                     "chat kl +0.100 (2 SDs 0.000): higher"]


def test_unit_criteria_aggregate_the_same_window_gradients_their_own_way():
    from benchmarks import structured_criteria as criteria

    model = build_model("llama", 97, init_range=0.2)
    windows = torch.randint(97, (3, 16), generator=torch.Generator().manual_seed(0))
    scores = criteria.gradient_criteria(model, windows, "ce")
    modules, groups = peers._groups(model)
    signed = []  # per window, the first group's (layer 0 MLP) signed sum of w * g over each unit
    for window in windows:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=window[None]).logits[0, :-1]
        torch.nn.functional.cross_entropy(logits, window[1:]).backward()  # the same operations: the same gradients
        wg = {n: (m.weight * m.weight.grad).detach().double() for n, m in modules.items()}
        signed.append(peers.structure.unit_scores(groups[0], wg, modules))
    signed = torch.stack(signed)
    # the same float32 products summed in float64 either way: only the order of the sums differs (~1e-16)
    torch.testing.assert_close(scores["group-fisher"][0], signed.square().sum(0), rtol=1e-5, atol=0)
    torch.testing.assert_close(scores["group-first-order"][0], signed.abs().sum(0), rtol=1e-5, atol=0)
    # LLM-Pruner's element-wise Taylor: the taylor peer's scores. There the gradients of 3 windows add up in
    # float32 (a few ulp of sum |g|, ~1e-7 of the unit's sum|wg| score, which is the scale allowed for below)
    taylor = peers.taylor_units(model, windows)
    torch.testing.assert_close(scores["|sum g|"][0], taylor[0].double(), rtol=1e-4,
                               atol=1e-5 * float(scores["sum|wg|"][0].max()))
    assert not torch.allclose(scores["sum|wg|"][0], scores["|sum g|"][0])  # abs before or after the sum differ


@pytest.mark.slow
def test_quick_criteria_benchmark_writes_a_row_per_criterion(tmp_path):
    from benchmarks import structured_criteria as criteria

    criteria.main(["--quick", "--dataset", str(SHARED_DATA), "--chat", str(tmp_path), "--sparsity", "0.3",
                   "--results", str(tmp_path / "criteria.json")])
    rows = json.loads((tmp_path / "criteria.json").read_text())["rows"]
    assert [r["criterion"] for r in rows] == [f"{c} ({labels})" for labels in ("ce", "sampled")
                                              for c in criteria.GRADIENT] + ["minitron"]
    assert all(r["kl"] > 0 and r["chat_kl"] > 0 for r in rows)
