"""Several runs side by side, from their `report.json`, so that a user can pick one.

Perplexities are only comparable when they were measured the same way; when the
runs used different protocols or token counts, `compare_runs` says so instead of
letting a table imply a ranking it cannot support.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UsageError
from .markdown import duration
from .plots import model_name

COLUMNS = [  # (key, header, right-aligned)
    ("run", "run", False), ("model", "model", False), ("sparsity", "sparsity", True),
    ("pattern", "pattern", False), ("dense_ppl", "dense PPL", True), ("pruned_ppl", "pruned PPL", True),
    ("ppl_increase", "change", True), ("kl", "KL to dense", True), ("agreement", "top-1 agree", True),
    ("loss", "loss", False), ("steps", "steps", True), ("seconds", "time", True),
]


def load_report(path: str | Path) -> tuple[Path, dict]:
    """A run's report from its output directory (or the `report.json` inside it)."""
    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"{path} holds no report.json; give the --out directory of a finished tapc compress run")
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {file} ({' '.join(str(exc).split())[:120]}); is it a tapc report?") from None
    if not isinstance(report, dict) or report.get("tool") != "tapc" or "perplexity" not in report:
        raise UsageError(f"{file} is not a tapc compress report; give the --out directory of a tapc compress run")
    return (path if path.is_dir() else file.parent), report


def run_row(folder: Path, report: dict) -> dict:
    """The columns of one run: what a user weighs when choosing between runs."""
    prune = report["recipe"]["prune"]
    dense, pruned = report["perplexity"]["dense"], report["perplexity"]["pruned"]
    return {
        "run": str(folder),  # as the user typed it: two runs may share a directory name
        "path": str(folder.resolve()),
        "model": model_name(report),
        "sparsity": report["sparsity"]["prunable_sparsity"],
        "target": prune["sparsity"],
        "pattern": prune.get("pattern") or report.get("pattern") or "unstructured",
        "dense_ppl": dense["ppl"],
        "pruned_ppl": pruned["ppl"],
        "ppl_increase": report["perplexity"]["increase"],
        "kl": pruned.get("kl"),  # None in reports written before drift was measured
        "agreement": pruned.get("agreement"),
        "loss": report["recipe"]["train"].get("loss", "ce"),
        "eval": {"protocol": pruned["protocol"], "tokens": pruned["tokens"]},
        "steps": report["train"]["steps"],
        "seconds": report.get("seconds", report["train"]["seconds"]),
        "recipe": report["recipe"]["name"],
        "version": report.get("version"),
    }


def compare_runs(paths: list[str | Path]) -> dict:
    """`{"runs": [row, ...], "comparable": bool, "note": str | None}`, runs in the order given."""
    if not paths:
        raise UsageError("give at least one output directory of a tapc compress run")
    rows = [run_row(*load_report(p)) for p in paths]
    protocols = {(r["eval"]["protocol"], r["eval"]["tokens"]) for r in rows}
    note = None
    if len(protocols) > 1:
        note = ("perplexities were measured on different windows or token counts ("
                + "; ".join(f"{r['run']}: {r['eval']['protocol']}, {r['eval']['tokens']:,} tokens" for r in rows)
                + "); compare the change column, not the raw values")
    return {"runs": rows, "comparable": note is None, "note": note}


def _cells(row: dict) -> dict[str, str]:
    return {
        "run": row["run"], "model": row["model"], "pattern": row["pattern"],
        "sparsity": f"{row['sparsity']:.2%}", "dense_ppl": f"{row['dense_ppl']:.3f}",
        "pruned_ppl": f"{row['pruned_ppl']:.3f}", "ppl_increase": f"{row['ppl_increase']:+.1%}",
        "kl": "-" if row["kl"] is None else f"{row['kl']:.4f}", "loss": row["loss"],
        "agreement": "-" if row["agreement"] is None else f"{row['agreement']:.1%}",
        "steps": f"{row['steps']:,}", "seconds": duration(row["seconds"]),
    }


def format_comparison(comparison: dict, markdown: bool = False) -> str:
    """The runs as an aligned text table, or as a Markdown table for a PR comment."""
    cells = [_cells(row) for row in comparison["runs"]]
    headers = [header for _, header, _ in COLUMNS]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |",
                 "| " + " | ".join("---:" if right else "---" for *_, right in COLUMNS) + " |"]
        lines += ["| " + " | ".join(c[key].replace("|", "\\|") for key, _, _ in COLUMNS) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max([len(header)] + [len(c[key]) for c in cells]) for key, header, _ in COLUMNS]

    def line(values):
        return "  ".join(v.rjust(w) if right else v.ljust(w)
                         for v, w, (*_, right) in zip(values, widths, COLUMNS)).rstrip()

    return "\n".join([line(headers)] + [line([c[key] for key, _, _ in COLUMNS]) for c in cells])
