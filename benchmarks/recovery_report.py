"""Turn finished benchmark runs into results.md, results.json and one loss plot per sparsity.

Recovery speed after a mask update at step u (the mask changes after step u's
optimizer step, so the loss of step u+1 is the first one the new mask sees):

* Every method sees the very same batches (same seed), so the batch-to-batch swing of
  a 1-window training loss is divided out with the loss of the dense fine-tuned run
  (same learning rate when there is one) on the same batch: r(t) = E(t) / E_dense(t).
  Without a dense run the raw loss is used.
* The pre-update level is the mean of r over the `PRE` steps up to and including u,
  so one easy or hard batch does not set it.
* Recovered at the first step s > u with r(s) <= 1.05 * pre; the count is s - u.
  If that does not happen before the next mask update (or the end of the run), the
  update is "not recovered" and counts as its window length plus one in the mean.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import asdict
from pathlib import Path

from .recovery_methods import default

PRE = 3
TOLERANCE = 0.05
DIVERGED = 1.5  # loss / dense fine-tuned loss above this: left out of the loss plot
NOISE = 0.005  # a probe jump under 0.5% of the loss counts as repaired at once


def _ratio_series(run: dict, dense: dict | None) -> list[float]:
    loss = run["log"]["loss"]
    if dense is None:
        return list(loss)
    return [a / b for a, b in zip(loss, dense["log"]["loss"])]


def recovery(run: dict, dense: dict | None) -> list[dict]:
    """Per mask update: steps until r is back within 5% of its pre-update level."""
    r = _ratio_series(run, dense)
    updates = [u["step"] for u in run["log"]["mask_updates"]]
    out = []
    for i, u in enumerate(updates):
        end = updates[i + 1] if i + 1 < len(updates) else len(r)
        pre = statistics.fmean(r[max(0, u - PRE) : u])  # r[u-1] is step u
        window = r[u:end]  # steps u+1 .. end
        steps = next((j + 1 for j, v in enumerate(window) if v <= (1 + TOLERANCE) * pre), None)
        jump = max(window) / pre - 1 if window else 0.0
        out.append({"step": u, "steps": steps, "window": len(window), "jump": jump})
    return out


def within_tolerance(loss: float, before: float) -> bool:
    """Back within 5% of the loss before the mask update."""
    return loss <= (1 + TOLERANCE) * before


def half_repaired(loss: float, before: float, jump: float) -> bool:
    """Half of the jump `jump` repaired (a jump under 0.5% of the loss needs no repair)."""
    return loss - before <= max(jump / 2, NOISE * before)


def probe_recovery(run: dict) -> list[dict]:
    """Per mask update, from the probe losses (see `recovery.ProbeRecovery`): the jump and
    the steps until the loss is within 5% of its level before the update, and until half
    of the jump is repaired (0: already at the first probe after the update; a jump under
    0.5% of the loss needs no repair)."""
    out = []
    for r in run.get("probe", []):
        before, trace = r["before"], r["trace"]
        jump = trace[0] - before
        within = next((k for k, v in enumerate(trace) if within_tolerance(v, before)), None)
        half = next((k for k, v in enumerate(trace) if half_repaired(v, before, jump)), None)
        out.append({"step": r["step"], "jump": jump / before, "within_5pct": within, "half": half,
                    "probed": len(trace) - 1})
    return out


def _mean_steps(rec: list[dict], key: str) -> float | None:
    """Mean steps over updates; one never reached counts as the steps probed plus one."""
    if not rec:
        return None
    return statistics.fmean(x[key] if x[key] is not None else x["probed"] + 1 for x in rec)


def mean_recovery(rec: list[dict]) -> float | None:
    rows = [x for x in rec if x["window"] > 0]
    if not rows:
        return None
    return statistics.fmean(x["steps"] if x["steps"] is not None else x["window"] + 1 for x in rows)


def _fmt_jump(row: dict) -> str:
    return "-" if row.get("mean_jump") is None else f"{row['mean_jump']:+.1%} / {row['max_jump']:+.1%}"


def _fmt_steps(row: dict, key: str) -> str:
    """'1, 0, 2 (1.0)': steps per mask update, then the mean ('>n': not within n probed steps)."""
    rec = row.get("probe") or []
    if not rec:
        return "-"
    steps = ", ".join(str(x[key]) if x[key] is not None else f">{x['probed']}" for x in rec)
    return f"{steps} ({_mean_steps(rec, key):.1f})"


def _dense_for(run: dict, runs: dict[str, dict]) -> dict | None:
    dense = [r for r in runs.values() if r["kind"] == "finetune"]
    same = [r for r in dense if r["lr"] == run.get("lr")]
    return (same or sorted(dense, key=lambda r: r["val_loss"]) or [None])[0]


def summarize(runs: dict[str, dict], sparsities: list[float]) -> dict:
    finetuned = [r for r in runs.values() if r["kind"] == "finetune"]
    ceiling = min(finetuned, key=lambda r: r["val_loss"]) if finetuned else None
    ceil_ppl = ceiling["perplexity"]["ppl"] if ceiling else None
    rows = {}
    for run in runs.values():
        if "perplexity" not in run:
            continue
        row = {"id": run["id"], "label": run["label"], "kind": run["kind"], "sparsity": run["sparsity"],
               "ppl": run["perplexity"]["ppl"], "vs_ceiling": run["perplexity"]["ppl"] / ceil_ppl if ceil_ppl else None,
               "lr": run.get("lr"), "ta_lr": (run.get("ta") or {}).get("lr"), "val_loss": run.get("val_loss"),
               "seconds_per_step": run["train_seconds"] / len(run["log"]["loss"]) if "log" in run else None}
        if run["kind"] in ("prune", "shock"):
            rec = recovery(run, _dense_for(run, runs))
            probe = probe_recovery(run)
            row.update({"recovery": rec, "mean_recovery": mean_recovery(rec),
                        "recovery_basis": "loss / dense fine-tuned loss" if _dense_for(run, runs) else "raw loss",
                        "probe": probe, "mean_jump": statistics.fmean(x["jump"] for x in probe) if probe else None,
                        "max_jump": max((x["jump"] for x in probe), default=None),
                        "mean_within_5pct": _mean_steps(probe, "within_5pct"), "mean_half": _mean_steps(probe, "half")})
        rows[run["id"]] = row
    verdicts = {}
    for s in sparsities:
        trained = [r for r in rows.values() if r["kind"] == "prune" and r["sparsity"] == s]
        adamw = [r for r in trained if r["ta_lr"] is None and "taylor" in r["id"]]
        ta = [r for r in trained if r["ta_lr"] is not None]
        oneshot = [r for r in rows.values() if r["kind"] == "oneshot" and r["sparsity"] == s]
        pick = lambda rs: min(rs, key=lambda r: r["val_loss"])["id"] if rs else None  # noqa: E731
        verdicts[str(s)] = {"best_recipe": pick(trained), "best_adamw": pick(adamw), "best_ta": pick(ta),
                            "best_oneshot_ppl": min((r["ppl"] for r in oneshot), default=None)}
    return {"ceiling": ceiling["id"] if ceiling else None, "ceiling_ppl": ceil_ppl, "rows": rows,
            "verdicts": verdicts}


def _plot(path: Path, runs: dict[str, dict], sparsity: float) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = sorted((r for r in runs.values() if r["kind"] == "prune" and r["sparsity"] == sparsity),
                     key=lambda r: r["id"])
    if not trained:
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    smooth = lambda xs, k=5: [statistics.fmean(xs[max(0, i - k + 1) : i + 1]) for i in range(len(xs))]  # noqa: E731
    # A run that diverged (its loss over 1.5 x the dense run's) would flatten every other curve.
    diverged = [r["id"] for r in trained if max(smooth(_ratio_series(r, _dense_for(r, runs)), 3)) > DIVERGED]
    trained = [r for r in trained if r["id"] not in diverged]
    if not trained:
        plt.close(fig)
        return False
    dense = sorted((r for r in runs.values() if r["kind"] == "finetune"), key=lambda r: r["val_loss"])
    for run in trained + dense[:1]:
        steps = range(1, len(run["log"]["loss"]) + 1)
        style = {"color": "black", "linestyle": "--"} if run["kind"] == "finetune" else {}
        line, = top.plot(steps, smooth(run["log"]["loss"]), label=run["id"], **style)
        if run["kind"] == "prune":
            ratio = _ratio_series(run, _dense_for(run, runs))
            bottom.plot(steps, smooth(ratio, 3), color=line.get_color())
            for u in run["log"]["mask_updates"]:
                top.plot(u["step"], smooth(run["log"]["loss"])[u["step"] - 1], "v", color=line.get_color())
    for u in trained[0]["log"]["mask_updates"]:
        for ax in (top, bottom):
            ax.axvline(u["step"], color="grey", linewidth=0.6, linestyle=":")
    top.set_ylabel("training loss (5-step mean)")
    bottom.set_ylabel("loss / dense fine-tuned loss, same batch (3-step mean)")
    bottom.set_xlabel("step (dotted: mask updates)")
    top.set_title(f"Recovery at {round(sparsity * 100)}% sparsity"
                  + (f" (not drawn, diverged: {', '.join(diverged)})" if diverged else ""), fontsize=10)
    top.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _shock(out: Path, runs: dict[str, dict]) -> list[str]:
    """Recovery from the one-shot mask: the probe loss after the update, AdamW against TA."""
    shocks = sorted((r for r in runs.values() if r["kind"] == "shock" and r.get("probe")), key=lambda r: r["id"])
    if not shocks:
        return []
    at = [1, 2, 5, 10, 20, 30]
    md = ["## Recovery from a one-shot mask", "",
          "The whole target pruned at once by global magnitude after step 1, then trained with the mask fixed; "
          "probe loss (held-out windows) before the update, right after it, and k steps later.", "",
          "| method | id | before | after | " + " | ".join(f"+{k}" for k in at) + " | steps to half | PPL |",
          "| --- | --- | --- | --- | " + " | ".join("---" for _ in at) + " | --- | --- |"]
    for r in shocks:
        probe, rec = r["probe"][0], probe_recovery(r)[0]
        trace = probe["trace"]
        cells = [f"{trace[k]:.4f}" if k < len(trace) else "" for k in at]
        half = rec["half"] if rec["half"] is not None else f">{rec['probed']}"
        md.append(f"| {r['label']} | `{r['id']}` | {probe['before']:.4f} | {trace[0]:.4f} | " + " | ".join(cells)
                  + f" | {half} | {r['perplexity']['ppl']:.2f} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return md + [""]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in shocks:
        probe = r["probe"][0]
        ax.plot(range(len(probe["trace"])), probe["trace"], marker=".", label=r["id"])
    ax.axhline(shocks[0]["probe"][0]["before"], color="black", linestyle="--", linewidth=0.8, label="before the mask")
    ax.set_xlabel("steps after the one-shot mask")
    ax.set_ylabel("probe loss (held-out windows)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "shock.png", dpi=110)
    plt.close(fig)
    return md + ["", "![recovery from a one-shot mask](shock.png)", ""]


def _table(summary: dict, sparsity: float | None) -> list[str]:
    lines = ["| method | id | lr | eta_TA | PPL | x ceiling | val loss | probe jump mean / max | "
             "steps to 5% | steps to half | train-loss steps | s/step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = [r for r in summary["rows"].values()
            if (r["sparsity"] == sparsity if sparsity is not None else r["kind"] in ("dense", "finetune"))]
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in sorted(rows, key=lambda r: (r["kind"] != "dense", r["kind"] != "oneshot", r["ppl"])):
        lines.append(f"| {r['label']} | `{r['id']}` | {f(r['lr'], 'g')} | {f(r['ta_lr'], 'g')} | {r['ppl']:.2f} | "
                     f"{f(r['vs_ceiling'], '.3f')} | {f(r['val_loss'], '.4f')} | {_fmt_jump(r)} | "
                     f"{_fmt_steps(r, 'within_5pct')} | {_fmt_steps(r, 'half')} | "
                     f"{f(r.get('mean_recovery'), '.1f')} | {f(r['seconds_per_step'], '.1f')} |")
    return lines


def _base_id(run_id: str) -> str:
    return re.sub(r"-seed\d+$", "", run_id)


PEER_KINDS = ("calibrated", "calibrated-train")


def _cost(cost: dict) -> list[str]:
    """The step time and memory table of a cost run: each configuration, and its ratio to plain AdamW."""
    med, loss = cost["median"], cost.get("loss", "ce")
    rows = [("steady step (s)", "step_s", "step_s", 1, ".2f"),
            (f"step incl. mask update every {cost['prune_every']} steps (s)", "amortized_s", "step_s", 1, ".2f"),
            ("peak resident memory (MiB)", "peak_rss", "peak_rss", 2**20, ".0f"),
            ("memory added by training (MiB)", "train_rss", "train_rss", 2**20, ".0f")]
    a, others = med["adamw"], [n for n in med if n != "adamw"]
    md = [f"## Cost of pruning + TA against plain AdamW (train.loss {loss})", "",
          f"Same model, batch and recipe, {cost['steps']} steps per run, {cost['repeats']} alternating runs each, "
          "one process per run (median)" + (", every run distilling from a frozen dense copy" * (loss != "ce")) + ".",
          "", "| | adamw | " + " | ".join(f"{n} | ratio" for n in others) + " |",
          "| --- |" + " ---: |" * (1 + 2 * len(others))]
    for label, key, base, scale, spec in rows:
        md.append(f"| {label} | {a[key] / scale:{spec}} | "
                  + " | ".join(f"{med[n][key] / scale:{spec}} | {med[n][key] / a[base]:.3f}" for n in others) + " |")
    return md + [""]


def _loss(run: dict) -> str | None:
    """The run's train.loss; None for a row that was never trained (a one-shot peer)."""
    return run["recipe"]["train"].get("loss", "ce") if "recipe" in run else None  # older runs: ce


def peer_table(runs: dict[str, dict], sparsities: list[float]) -> tuple[list[str], dict]:
    """The peers' rows: every method run with the peers' settings, mean and standard deviation over seeds.

    Two tables: the rows trained on cross-entropy (ranked by validation loss), and those
    trained by distillation (ranked by their drift from the dense model on the validation
    windows); the one-shot rows, never trained, head both. The default job's row (quick-cpu's settings
    at that sparsity, under distillation) says so."""
    groups: dict[str, list[dict]] = {}
    for run in runs.values():
        if "perplexity" in run:
            groups.setdefault(_base_id(run["id"]), []).append(run)
    peer_sparsities = {r["sparsity"] for r in runs.values() if r["kind"] in PEER_KINDS}
    default_ids = {s: f"{default(s).id}-kd" for s in peer_sparsities}
    rows = {}
    for base, group in groups.items():
        first = group[0]
        if first["sparsity"] not in peer_sparsities or first["kind"] not in ("prune", *PEER_KINDS):
            continue
        if first["kind"] == "prune" and not re.fullmatch(r"s\d+-taylor-(cescore-((warmup|stability|score_steps)[\d.]+-)*)?(adamw|ta[\d.e-]+(-before_clip-True)?)-lr[\d.e-]+(-kd|-ce-kd)?",
                                                         base):
            continue  # the TA matrix's variants (other TA settings) stay in their own tables
        label = first["label"]
        if base == default_ids[first["sparsity"]]:
            label = f"**{label}: quick-cpu's default**"
        row = {"id": base, "label": label, "sparsity": first["sparsity"], "seeds": len(group),
               "loss": _loss(first), "oneshot_seconds": first.get("oneshot_seconds")}
        # The one-shot mask's jump (probe loss over the dense model's) and the steps to repair half of it.
        landed = [p[0] for p in map(probe_recovery, group) if p and p[0]["step"] == 0]
        row["oneshot_jump"] = statistics.fmean(x["jump"] for x in landed) if landed else None
        row["half_steps"] = [x["half"] if x["half"] is not None else f">{x['probed']}" for x in landed]
        for key, values in (("ppl", [r["perplexity"]["ppl"] for r in group]),
                            ("kl", [r["perplexity"].get("kl") for r in group]),
                            ("agreement", [r["perplexity"].get("agreement") for r in group]),
                            ("val_loss", [r.get("val_loss") for r in group]),
                            ("val_kl", [r.get("val_kl") for r in group])):
            values = [v for v in values if v is not None]
            row[key] = statistics.fmean(values) if values else None
            row[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        rows[base] = row
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = ["| sparsity | method | id | seeds | PPL mean | PPL sd | val loss mean | val loss sd |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted((r for r in rows.values() if r["loss"] in (None, "ce")),
                    key=lambda r: (r["sparsity"], r["val_loss"] is not None, r["val_loss"] or r["ppl"])):
        lines.append(f"| {r['sparsity']:.0%} | {r['label']} | `{r['id']}` | {r['seeds']} | {r['ppl']:.2f} | "
                     f"{f(r['ppl_sd'], '.2f')} | {f(r['val_loss'], '.4f')} | {f(r['val_loss_sd'], '.4f')} |")
    distilled = [r for r in rows.values() if r["loss"] not in (None, "ce")]
    if distilled:
        lines += ["", "Trained by distillation from the dense model (`--loss kd`, the default recovery loss), "
                  "ranked by KL(dense || pruned) on the validation windows; KL and top-1 agreement with the dense "
                  "model on the test tokens of the PPL.", "",
                  "| sparsity | method | loss | id | seeds | PPL mean | PPL sd | KL mean | KL sd | top-1 | "
                  "val KL mean | val KL sd | one-shot jump, steps to half |",
                  "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        shown = [r for r in rows.values() if r["loss"] is None and r["sparsity"] in {d["sparsity"] for d in distilled}]
        for r in sorted(shown + distilled, key=lambda r: (r["sparsity"], r["val_kl"] is not None,
                                                            r["val_kl"] or r["kl"] or r["ppl"])):
            lines.append(f"| {r['sparsity']:.0%} | {r['label']} | {r['loss'] or '-'} | `{r['id']}` | {r['seeds']} | "
                         f"{r['ppl']:.2f} | {f(r['ppl_sd'], '.2f')} | {f(r['kl'], '.4f')} | {f(r['kl_sd'], '.4f')} | "
                         f"{f(r['agreement'], '.1%')} | {f(r['val_kl'], '.4f')} | {f(r['val_kl_sd'], '.4f')} | "
                         + (f"{r['oneshot_jump']:+.1%}: {', '.join(map(str, r['half_steps']))} |"
                            if r["half_steps"] else "- |"))
    return lines, rows


def write(out: Path, settings, runs: dict[str, dict]) -> dict:
    peer_lines, peer_rows = peer_table(runs, settings.sparsities)
    # The TA matrix's tables: seed 0, cross-entropy only (its recovery measures divide by the dense CE loss).
    runs = {k: r for k, r in runs.items() if _base_id(k) == k and _loss(r) in (None, "ce")}
    summary = summarize(runs, settings.sparsities)
    summary["peers"] = peer_rows
    model = next((r["model"] for r in runs.values() if "model" in r), None)
    dense = runs.get("dense", {}).get("perplexity", {})
    md = ["# Recovery benchmark", "",
          f"Model: `{model}`. Evaluation: {dense.get('protocol', '-')}, {dense.get('tokens', '-')} predicted "
          f"tokens of the test split. Training: {settings.steps} steps of {settings.batch_size} x {settings.seq_len} "
          f"tokens, seed {settings.seed}, linear LR decay, mask update every {settings.prune_every} steps.",
          f"Learning rates are chosen by the validation loss on {settings.val_windows} windows of "
          f"{settings.seq_len} validation tokens, never by the test perplexity.",
          f"Recovery after each mask update, on {settings.probe_windows} fixed held-out validation windows "
          "(the probe): the loss jump the update causes, the steps until the probe loss is back within "
          f"{TOLERANCE:.0%} of its level before the update (0: it never left), and until half the jump is "
          "repaired; per update, then the mean (`>n`: not within the n steps probed). "
          "Train-loss steps: the same 5% rule on the training loss divided by the dense fine-tuned run's "
          f"loss on the same batch, against its mean over the {PRE} steps before (mean over updates).",
          "s/step: wall time of the run under whatever else the machine ran; not a cost measure "
          "(see the cost table).", "",
          "## Dense", "", *_table(summary, None), ""]
    if peer_rows:
        md += ["## Against the peers (SparseGPT, per-row Wanda)", "",
               f"SparseGPT and per-row Wanda one-shot on {settings.calib_windows} windows of {settings.oneshot_len} "
               "training tokens drawn by the seed, then the same training budget with the mask fixed; tapc's "
               "dynamic job from dense and from the SparseGPT mask. A seed changes the batches and the calibration "
               "windows. Sorted by validation loss (one-shot rows, untrained, first).", "", *peer_lines, ""]
    for s in settings.sparsities:
        png = f"loss-s{round(s * 100)}.png"
        has_plot = _plot(out / png, runs, s)
        v = summary["verdicts"][str(s)]
        md += [f"## {round(s * 100)}% sparsity", "", *_table(summary, s), ""]
        for key in ("best_recipe", "best_adamw", "best_ta"):
            if v[key]:
                row = summary["rows"][v[key]]
                md.append(f"- {key.replace('_', ' ')} (by validation loss): `{v[key]}`, PPL {row['ppl']:.2f}"
                          + (f" = {row['vs_ceiling']:.3f} x ceiling" if row["vs_ceiling"] else ""))
        if v["best_oneshot_ppl"]:
            md.append(f"- best one-shot PPL: {v['best_oneshot_ppl']:.2f}")
        md += ["", f"![loss curves at {round(s * 100)}%]({png})" if has_plot else "", ""]
    md += _shock(out, runs)
    for key in ("cost", "cost-kd"):
        if key in runs:
            md += _cost(runs[key])
    (out / "results.md").write_text("\n".join(md))
    result = {"settings": asdict(settings), "model": model, "summary": summary, "runs": runs}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result
