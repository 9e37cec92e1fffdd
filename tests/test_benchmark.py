"""The recovery benchmark of issue 4: its quick mode runs end to end (so the script
cannot rot) and its recovery-speed metric counts what it says it counts."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks import recovery, recovery_report

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


def test_quick_benchmark_end_to_end_and_resumes(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["--quick", "--dataset", str(SHARED_DATA), "--out", str(out), "--lrs", "0.003"]
    result = recovery.main(args)
    rows = result["summary"]["rows"]
    kinds = {r["kind"] for r in rows.values()}
    assert kinds == {"dense", "oneshot", "finetune", "prune", "shock"}
    assert {"s50-oneshot-magnitude", "s50-oneshot-wanda", "s50-taylor-adamw-lr0.003", "s50-taylor-ta0.01-lr0.003",
            "s50-gmp-adamw-lr0.003", "s50-taylor-ta0.003-lr0.003", "dense-finetune-lr0.003"} <= set(rows)
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
    assert "| one-shot global Wanda (not the paper's per-row Wanda) |" in md and "## Cost of pruning + TA" in md
    assert "## Recovery from a one-shot mask" in md and (out / "shock.png").stat().st_size > 1000
    assert (out / "loss-s50.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text())["summary"]["ceiling"] == "dense-finetune-lr0.003"
    # A rerun finds every method done and trains nothing.
    capsys.readouterr()
    again = recovery.main(args)
    assert capsys.readouterr().err == ""
    assert again["summary"] == result["summary"]


def test_peer_rows_average_over_seeds(tmp_path):
    """Issue 11's rows: SparseGPT one-shot and then AdamW, two seeds, one line each with mean and sd."""
    out = tmp_path / "bench"
    ids = ["s50-sparsegpt", "s50-sparsegpt-adamw-lr0.003"]
    for seed in (0, 1):
        only = ",".join(ids if seed == 0 else [f"{i}-seed1" for i in ids])
        result = recovery.main(["--quick", "--peers", "--dataset", str(SHARED_DATA), "--out", str(out), "--lrs",
                                "0.003", "--no-cost", "--seed", str(seed), "--only", only])
    peers = result["summary"]["peers"]
    assert set(peers) == set(ids)
    for row in peers.values():
        assert row["seeds"] == 2 and row["ppl_sd"] is not None and row["ppl_sd"] > 0  # other windows and batches
    assert peers["s50-sparsegpt-adamw-lr0.003"]["val_loss"] is not None
    md = (out / "results.md").read_text()
    assert "## Against the peers (issue 11)" in md and "| SparseGPT, then AdamW, mask fixed |" in md


def test_peer_rows_by_distillation_are_ranked_by_drift(tmp_path):
    """`--loss kd`: every trained row distils from the dense model, is stored apart from the CE rows
    (ids end in -kd), records its drift on validation and test tokens, and reuses the one-shot mask from disk.
    Its cost run distils too, and times the CE-scored step beside the default one."""
    out = tmp_path / "bench"
    base = ["--quick", "--peers", "--dataset", str(SHARED_DATA), "--out", str(out), "--lrs", "0.003"]
    ids = ["s50-sparsegpt", "s50-sparsegpt-adamw-lr0.003-kd"]
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
    assert set(result["summary"]["rows"]) == {"s50-sparsegpt"}  # issue 4's tables: cross-entropy only
    # The one-shot mask's jump, probed from before step 1 until half of it is repaired.
    landed = run["probe"][0]
    assert landed["step"] == 0 and landed["before"] > 0 and landed["trace"][0] != landed["before"]
    md = (out / "results.md").read_text()
    assert "Trained by distillation from the dense model" in md and "| kd | `s50-sparsegpt-adamw-lr0.003-kd` |" in md
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

    runs = {r["id"]: r for r in [
        {"id": "s30-sparsegpt", "label": "SparseGPT one-shot", "kind": "calibrated", "sparsity": 0.3,
         "perplexity": {"ppl": 32.0}},
        run("s30-taylor-cescore-ta0.1-lr5e-05-kd", 0.3, 0.08), run("s30-taylor-cescore-ta0.1-lr0.0001-kd", 0.3, 0.1),
        {"id": "s50-sparsegpt", "label": "SparseGPT one-shot", "kind": "calibrated", "sparsity": 0.5,
         "perplexity": {"ppl": 52.0}},
        run("s50-taylor-cescore-warmup0.05-ta0.1-lr0.0002-kd", 0.5, 0.35),
        run("s50-taylor-cescore-ta0.1-lr0.0002-kd", 0.5, 0.36)]}
    _, rows = recovery_report.peer_table(runs, [0.3, 0.5])
    marked = {i for i, r in rows.items() if "quick-cpu's default" in r["label"]}
    assert marked == {"s30-taylor-cescore-ta0.1-lr5e-05-kd", "s50-taylor-cescore-warmup0.05-ta0.1-lr0.0002-kd"}


def test_default_job_variants_change_the_optimizer_and_nothing_else():
    """Item 5 under KD compares the default job with itself under plain AdamW and another eta_TA."""
    base = recovery.default(0.5)
    adamw, ta1 = recovery.default(0.5, ta_lr=None), recovery.default(0.5, ta_lr=1.0)
    assert adamw.overrides["ta.enabled"] is False and ta1.overrides["ta.lr"] == 1.0
    assert base.overrides["ta.lr"] == 0.1
    ta_keys = {"ta.enabled", "ta.lr"}
    for variant in (adamw, ta1):
        assert {k: v for k, v in variant.overrides.items() if k not in ta_keys} == \
               {k: v for k, v in base.overrides.items() if k not in ta_keys}
    assert adamw.id == "s50-taylor-cescore-warmup0.05-adamw-lr0.0002"
    assert ta1.id == "s50-taylor-cescore-warmup0.05-ta1-lr0.0002"
