"""The benchmark scripts themselves: the recovery benchmark runs a tiny experiment end to end (so the script
cannot rot), its report rebuilds its tables from the run JSONs alone, its recovery-speed metrics count what
they say, and every method a plan names is one recipe tapc accepts. Nothing here pins the catalogue of
experiments: ids are built by the same functions the benchmark builds them with."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from benchmarks import recovery, recovery_report
from benchmarks import recovery_methods as methods
from compressor.recipe import load_recipe

from .conftest import SHARED_DATA


def _run(loss, updates):
    return {"kind": "prune", "log": {"loss": loss, "mask_updates": [{"step": u} for u in updates]}}


def test_recovery_counts_steps_back_within_five_percent_of_pre_update_mean():
    # Steps 1..4 sit at 2.0, the update after step 4 lifts the loss, back within 5% at step 7.
    loss = [2.0, 2.0, 2.0, 2.0, 3.0, 2.5, 2.09, 2.0, 2.0, 2.0]
    rec = recovery_report.recovery(_run(loss, [4]), None)
    assert rec == [{"step": 4, "steps": 3, "window": 6, "jump": 0.5}]


def test_recovery_divides_out_batch_difficulty_and_censors_at_next_update():
    dense = _run([1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0], [])
    dense["kind"] = "finetune"
    # Twice the dense loss on every batch before step 3, then 1.5x worse and never back.
    loss = [2.0, 4.0, 2.0, 6.0, 3.0, 6.0, 3.0, 6.0]
    rec = recovery_report.recovery(_run(loss, [3, 6]), dense)
    assert [(r["step"], r["steps"], r["window"]) for r in rec] == [(3, None, 3), (6, 1, 2)]
    assert recovery_report.mean_recovery(rec) == (4 + 1) / 2


def test_probe_recovery_counts_steps_to_within_5pct_and_to_half_the_jump():
    # Before 2.0, a jump to 3.0 (+50%), then 2.6, 2.4 (half repaired), 2.08 (within 5%).
    run = {"probe": [{"step": 10, "before": 2.0, "trace": [3.0, 2.6, 2.4, 2.08]},
                     {"step": 20, "before": 2.0, "trace": [2.005]}]}  # under 0.5%: nothing to repair
    rec = recovery_report.probe_recovery(run)
    assert [(r["within_5pct"], r["half"], r["probed"]) for r in rec] == [(3, 2, 3), (0, 0, 0)]
    assert rec[0]["jump"] == 0.5
    censored = recovery_report.probe_recovery({"probe": [{"step": 5, "before": 2.0, "trace": [3.0, 2.9]}]})
    assert (censored[0]["within_5pct"], censored[0]["half"]) == (None, None)
    assert recovery_report._mean_steps(censored, "half") == 2  # never reached: probed steps + 1


PLANS = {"default": {}, "quick": recovery.QUICK, "full": recovery.FULL, "peers": {"peers": True},
         "peers, distilled": {"peers": True, "loss": "kd"}}


@pytest.mark.parametrize("plan", list(PLANS))
def test_every_planned_method_is_one_recipe_tapc_accepts(plan):
    """A run is stored and resumed by its id: one id is one method, and its recipe overrides are valid."""
    settings = recovery.Settings(**PLANS[plan])
    bench = SimpleNamespace(settings=settings)  # all `recipe_for` reads
    seen = {}
    for method in recovery.plan(settings, {}):
        assert seen.setdefault(method.id, method) == method, method.id  # a plan may name a method twice
        if method.kind in (*recovery.TRAINED, "calibrated"):
            recipe = recovery.recipe_for(bench, method)
            assert recipe.prune.sparsity == method.sparsity or method.kind == "finetune"
            assert recipe.train.loss == settings.loss
    assert "dense" in seen and len(seen) > 1


def _fake_run(settings, method, ppl: float, **more) -> dict:
    return {"id": method.id, "label": method.label, "kind": method.kind, "sparsity": method.sparsity,
            "settings": settings.fingerprint(method.kind), "model": "a tiny model",
            "perplexity": {"ppl": ppl, "protocol": "windows of 64", "tokens": 256}, **more}


def _fake_trained(settings, method, ppl: float, val_loss: float, seed: int = 0) -> dict:
    steps = settings.steps
    updates = [] if method.kind == "finetune" else [{"step": 2}, {"step": 4}]
    over = method.overrides
    run = _fake_run(settings, method, ppl, lr=over["optim.lr"], val_loss=val_loss, val_kl=0.1,
                    train_seconds=0.5 * steps, log={"loss": [3.0 - 0.1 * i for i in range(steps)],
                                                    "mask_updates": updates},
                    ta={"lr": over["ta.lr"]} if over.get("ta.enabled") else None, recipe={"train": {"loss": "ce"}})
    if updates:
        run["probe"] = [{"step": 2, "before": 2.9, "trace": [3.2, 2.95, 2.9]},
                        {"step": 4, "before": 2.7, "trace": [2.72]}]
    if seed:
        run["id"] = f"{run['id']}-seed{seed}"
        run["settings"]["seed"] = seed
    return run


def test_report_rebuilds_its_tables_from_run_jsons(tmp_path):
    """`--report-only` reads OUT/runs/*.json, keeps the runs of the same settings, and writes results.{md,json}
    and the loss plot from them, without a model or data."""
    settings = recovery.Settings(**recovery.QUICK)
    s, lr = settings.sparsities[0], settings.lrs[0]
    adamw, ta = methods.taylor(s, lr), methods.taylor(s, lr, settings.ta_lrs[0])
    finetune, oneshot = methods.finetune(lr), methods.peer(s, "sparsegpt")
    fixed_mask = methods.peer(s, "sparsegpt", lr)
    runs = [_fake_run(settings, recovery.Method("dense", "dense", "dense"), 20.0),
            _fake_trained(settings, finetune, 21.0, 2.9),
            _fake_trained(settings, adamw, 30.0, 3.2), _fake_trained(settings, ta, 29.0, 3.1),
            _fake_run(settings, oneshot, 40.0), _fake_trained(settings, fixed_mask, 31.0, 3.3),
            _fake_trained(settings, fixed_mask, 33.0, 3.5, seed=1)]
    other = _fake_trained(settings, methods.taylor(s, 2 * lr), 25.0, 3.0)
    other["settings"]["steps"] += 1  # another budget: not this report's
    (tmp_path / "runs").mkdir()
    for run in [*runs, other]:
        (tmp_path / "runs" / f"{run['id']}.json").write_text(json.dumps(run))

    result = recovery.main(["--quick", "--report-only", "--out", str(tmp_path)])

    summary = result["summary"]
    assert set(summary["rows"]) == {r["id"] for r in runs if "-seed" not in r["id"]}  # seed 0 rows only
    assert summary["ceiling"] == finetune.id and summary["verdicts"][str(s)]["best_recipe"] == ta.id
    assert summary["verdicts"][str(s)]["best_adamw"] == adamw.id
    peer_row = summary["peers"][fixed_mask.id]  # both seeds, one row
    assert peer_row["seeds"] == 2 and peer_row["ppl"] == 32.0 and peer_row["ppl_sd"] > 0
    md = (tmp_path / "results.md").read_text()
    for run in runs:
        assert f"`{run['id'].removesuffix('-seed1')}`" in md
    assert other["id"] not in md
    assert "## Against the peers" in md and f"| {fixed_mask.label} |" in md
    assert (tmp_path / f"loss-{methods.sid(s)}.png").stat().st_size > 1000
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == json.loads(json.dumps(summary))


@pytest.mark.slow
def test_quick_benchmark_end_to_end_and_resumes(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["--quick", "--dataset", str(SHARED_DATA), "--out", str(out), "--lrs", "0.003"]
    result = recovery.main(args)
    rows = result["summary"]["rows"]
    stored = {p.stem for p in (out / "runs").glob("*.json")}
    assert set(rows) == stored - {"cost"}  # every finished method is written, and reported
    # Every kind of row the quick plan has runs: no training, one-shot, dense fine-tuning, dynamic pruning,
    # and recovery from a one-shot mask.
    assert {r["kind"] for r in rows.values()} >= {"dense", "oneshot", "finetune", "prune", "shock"}
    for row in rows.values():
        assert row["ppl"] > 1
        if row["kind"] == "prune":
            assert len(row["recovery"]) >= 2 and row["vs_ceiling"] > 0
            assert len(row["probe"]) == len(row["recovery"])  # one probe record per mask update
        if row["kind"] == "shock":
            assert [p["step"] for p in row["probe"]] == [1]  # the whole mask at once
    cost = result["runs"]["cost"]["ratios"]
    assert cost["step_time"] > 0 and cost["peak_memory"] > 0
    md = (out / "results.md").read_text()
    assert all(f"`{row_id}`" in md for row_id in rows) and "## Cost of pruning + TA" in md
    assert "## Recovery from a one-shot mask" in md and (out / "shock.png").stat().st_size > 1000
    assert (out / "loss-s50.png").stat().st_size > 1000
    finetuned = [r for r in rows.values() if r["kind"] == "finetune"]
    ceiling = min(finetuned, key=lambda r: r["val_loss"])["id"]
    assert json.loads((out / "results.json").read_text())["summary"]["ceiling"] == ceiling
    # A rerun finds every method done and trains nothing.
    capsys.readouterr()
    again = recovery.main(args)
    assert capsys.readouterr().err == ""
    assert again["summary"] == result["summary"]


@pytest.mark.slow
def test_peer_rows_average_over_seeds(tmp_path):
    """The peers' rows: SparseGPT one-shot and then AdamW, two seeds, one line each with mean and sd."""
    out = tmp_path / "bench"
    oneshot, fixed_mask = methods.peer(0.5, "sparsegpt"), methods.peer(0.5, "sparsegpt", 0.003)
    ids = [oneshot.id, fixed_mask.id]
    for seed in (0, 1):
        only = ",".join(ids if seed == 0 else [f"{i}-seed1" for i in ids])
        result = recovery.main(["--quick", "--peers", "--dataset", str(SHARED_DATA), "--out", str(out), "--lrs",
                                "0.003", "--no-cost", "--seed", str(seed), "--only", only])
    peers = result["summary"]["peers"]
    assert set(peers) == set(ids)
    for row in peers.values():
        assert row["seeds"] == 2 and row["ppl_sd"] is not None and row["ppl_sd"] > 0  # other windows and batches
    assert peers[fixed_mask.id]["val_loss"] is not None
    md = (out / "results.md").read_text()
    assert "## Against the peers" in md and f"| {fixed_mask.label} |" in md


@pytest.mark.slow
def test_peer_rows_by_distillation_are_ranked_by_drift(tmp_path):
    """`--loss kd`: every trained row distils from the dense model, is stored apart from the CE rows
    (ids end in -kd), records its drift on validation and test tokens, and reuses the one-shot mask from disk.
    Its cost run distils too, and times the CE-scored step beside the default one."""
    out = tmp_path / "bench"
    base = ["--quick", "--peers", "--dataset", str(SHARED_DATA), "--out", str(out), "--lrs", "0.003"]
    oneshot, fixed_mask = methods.peer(0.5, "sparsegpt"), methods.peer(0.5, "sparsegpt", 0.003)
    ids = [oneshot.id, f"{fixed_mask.id}-kd"]  # the one-shot row is never trained: no suffix
    result = recovery.main([*base, "--loss", "kd", "--only", ",".join([*ids, "cost-kd"])])
    cost = result["runs"]["cost-kd"]
    assert cost["loss"] == "kd" and set(cost["median"]) == {"adamw", "prune+ta", "prune+ta, CE scores",
                                                            "prune+ta, no scores"}
    assert all(m["step_s"] > 0 for m in cost["median"].values())
    assert set(result["summary"]["peers"]) == set(ids)
    assert list((out / "cache").glob("sparsegpt-s50-*.pt"))  # the next process loads it instead of recomputing
    run = json.loads((out / "runs" / f"{ids[1]}.json").read_text())
    assert run["recipe"]["train"]["loss"] == "kd"
    assert run["val_kl"] > 0 and run["perplexity"]["kl"] > 0 and 0 < run["perplexity"]["agreement"] < 1
    assert set(result["summary"]["rows"]) == {oneshot.id}  # the TA matrix's tables: cross-entropy only
    # The one-shot mask's jump, probed from before step 1 until half of it is repaired.
    landed = run["probe"][0]
    assert landed["step"] == 0 and landed["before"] > 0 and landed["trace"][0] != landed["before"]
    md = (out / "results.md").read_text()
    assert "Trained by distillation from the dense model" in md and f"| kd | `{ids[1]}` |" in md
    assert "## Cost of pruning + TA against plain AdamW (train.loss kd)" in md
    with pytest.raises(SystemExit, match="add --peers"):
        recovery.main([a for a in base if a != "--peers"] + ["--loss", "kd"])


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / "m.lock"
    lock.write_text(dead.stdout.strip())  # its process has exited
    assert recovery._take(lock) and lock.read_text() == str(os.getpid())
    assert not recovery._take(lock)  # now held by a live process (this one)


def test_edge_export_table_renders_every_artifact():
    """The edge benchmark's table from a result of its own shape (the script must not rot between runs)."""
    from benchmarks import edge_export

    row = {"bytes": 1e8, "ppl": 20.0, "top1": 0.9, "decode_tps": 50.0, "prefill_tps": 900.0}
    rows = {name: dict(row) for name in edge_export.LABELS}
    rows["onnx-int4"]["genai_decode_tps"] = 60.0
    table = edge_export.markdown({"runs": [{"sparsity": 0.3, "rows": rows, "no_cache_decode_tps": 5.0}]})
    assert len(table.splitlines()) == 2 + len(edge_export.LABELS) + 1
    assert "| 30% | ONNX int4 | 100.0 | 1.000 | 20.00 | 90.0% | 50.0 | 60.0 | 900 |" in table


def test_peer_table_marks_the_default_job_at_each_sparsity():
    """The row whose settings are quick-cpu's at its sparsity (under KD) says it is the default; a row with
    the same method at another lr does not."""
    def run(run_id, sparsity, val_kl):
        return {"id": run_id, "label": "dynamic Taylor", "kind": "prune", "sparsity": sparsity,
                "recipe": {"train": {"loss": "kd"}}, "val_kl": val_kl,
                "perplexity": {"ppl": 30.0, "kl": 0.1, "agreement": 0.8}}

    runs, defaults = {}, set()
    for sparsity in (0.3, 0.5):
        oneshot = methods.peer(sparsity, "sparsegpt")
        runs[oneshot.id] = {"id": oneshot.id, "label": oneshot.label, "kind": oneshot.kind, "sparsity": sparsity,
                            "perplexity": {"ppl": 40.0}}
        default = methods.default(sparsity)
        lr = default.overrides["optim.lr"]
        elsewhere = default.id.replace(methods.lr_id(lr), methods.lr_id(2 * lr))
        for run_id, val_kl in ((f"{default.id}-kd", 0.1), (f"{elsewhere}-kd", 0.08)):
            runs[run_id] = run(run_id, sparsity, val_kl)
        defaults.add(f"{default.id}-kd")
    _, rows = recovery_report.peer_table(runs, [0.3, 0.5])
    assert {i for i, r in rows.items() if "quick-cpu's default" in r["label"]} == defaults


def test_default_job_variants_change_the_optimizer_and_nothing_else():
    """The default job against itself under plain AdamW and under another eta_TA."""
    recipe = load_recipe("quick-cpu", {"prune.sparsity": 0.5})
    base = methods.default(0.5)
    adamw, ta1 = methods.default(0.5, ta_lr=None), methods.default(0.5, ta_lr=1.0)
    assert base.overrides["ta.lr"] == recipe.ta.lr and base.overrides["optim.lr"] == recipe.optim.lr
    assert adamw.overrides["ta.enabled"] is False and ta1.overrides["ta.lr"] == 1.0
    ta_keys = {"ta.enabled", "ta.lr"}
    for variant in (adamw, ta1):
        assert {k: v for k, v in variant.overrides.items() if k not in ta_keys} == \
               {k: v for k, v in base.overrides.items() if k not in ta_keys}
    tag = f"-ta{recipe.ta.lr:g}-"
    assert adamw.id == base.id.replace(tag, "-adamw-") and ta1.id == base.id.replace(tag, "-ta1-")
