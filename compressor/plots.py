"""The two pictures of a run, drawn at the end from the logged data.

`training.png` tells the run as a story in time: the training loss (raw and
smoothed) jumps at each mask update and comes back, validation loss points, the
sparsity climbing to its target on a second axis, and the final stretch where the
mask is fixed. `layers.png` shows where the global budget went: the sparsity of every
pruned weight matrix in model order, grouped by block, attention and MLP told apart.

matplotlib is optional (`pip install 'tapc[plots]'`). It is used through `Figure`
and the Agg canvas only, never pyplot: no display, no global backend switched under
a user who imported tapc into a notebook, nothing drawn while training runs.
"""

from __future__ import annotations

import re
from pathlib import Path

PLOT_FILES = {"training": "training.png", "layers": "layers.png"}
DPI = 120

# Colours from matplotlib's default cycle, fixed so both plots and the legend agree.
LOSS, SMOOTH, VAL, SPARSITY = "#9ecae1", "#1f77b4", "#2ca02c", "#ff7f0e"
ATTENTION, MLP, OTHER = "#1f77b4", "#ff7f0e", "#7f7f7f"


def plots_available() -> str | None:
    """None when matplotlib can be imported; else one line saying why plots are skipped."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "plots skipped: matplotlib is not installed (pip install 'tapc[plots]')"
    return None


def smooth(values: list[float], span: int) -> list[float]:
    """Exponential moving average, bias-corrected like TensorBoard's.

    Causal on purpose: a centred average would show the loss rising before the
    pruning step that caused the rise.
    """
    if span <= 1:
        return list(values)
    decay = 1.0 - 2.0 / (span + 1)
    out, avg, weight = [], 0.0, 0.0
    for value in values:
        avg = decay * avg + (1 - decay) * value
        weight = decay * weight + (1 - decay)
        out.append(avg / weight)
    return out


def smoothing_span(steps: int) -> int:
    """Enough to calm batch noise, short enough that each mask update's spike still shows."""
    return max(1, min(25, round(steps / 25)))


def model_name(report: dict) -> str:
    """What a reader calls the model: the Hub id, or the file or directory name."""
    model = report.get("model", {})
    return model.get("id") or Path(str(model.get("path") or model.get("spec") or "model")).name


def _title(report: dict) -> str:
    name = model_name(report)
    target = report["recipe"]["prune"]["sparsity"]
    ppl = report.get("perplexity", {})
    line = f"{name} pruned to {target:.0%}"
    if "dense" in ppl and "pruned" in ppl:
        line += f": perplexity {ppl['dense']['ppl']:.2f} dense, {ppl['pruned']['ppl']:.2f} pruned"
    return line


def training_figure(log: dict, report: dict):
    """Loss per step (raw, smoothed), validation loss, sparsity and every mask update."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    loss = log["loss"]
    steps = list(range(1, len(loss) + 1))
    fig = Figure(figsize=(10, 5.5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(steps, loss, color=LOSS, linewidth=0.8, label="training loss")
    span = smoothing_span(len(loss))
    if span > 1:
        ax.plot(steps, smooth(loss, span), color=SMOOTH, linewidth=1.8,
                label=f"training loss, smoothed (EMA {span} steps)")
    validation = log.get("validation") or []
    if validation:
        ax.plot([v["step"] for v in validation], [v["loss"] for v in validation], "o-", color=VAL,
                linewidth=1.2, markersize=5, label="validation loss", zorder=4)
        if validation[0]["step"] == 0:
            ax.axhline(validation[0]["loss"], color=VAL, linestyle=":", linewidth=1.0,
                       label="validation loss of the dense model")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (cross-entropy, nats/token)")
    ax.set_xlim(0, max(len(loss), 1))

    updates = log.get("mask_updates") or []
    for i, update in enumerate(updates):
        # Many updates would paint the plot orange; thin them out with transparency.
        ax.axvline(update["step"], color=SPARSITY, linewidth=0.8, alpha=0.5 if len(updates) <= 60 else 0.2,
                   label=f"mask update ({len(updates)})" if i == 0 else None, zorder=1)
    if updates and updates[-1]["step"] < len(loss):
        ax.axvspan(updates[-1]["step"], len(loss), color=VAL, alpha=0.07,
                   label="mask fixed: recovery only", zorder=0)

    right = ax.twinx()
    right.step([0] + steps, [0.0] + list(log.get("sparsity") or [0.0] * len(loss)), where="post",
               color=SPARSITY, linewidth=1.8, label="sparsity (right axis)")
    if updates:
        right.plot([u["step"] for u in updates], [u["sparsity"] for u in updates], "o", color=SPARSITY,
                   markersize=3.5)
    target = report["recipe"]["prune"]["sparsity"]
    right.axhline(target, color=SPARSITY, linestyle="--", linewidth=1.0,
                  label=f"target sparsity {target:.0%}")
    right.set_ylim(0, min(1.0, max(target, 0.05) * 1.25))
    right.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    right.set_ylabel("sparsity of the prunable weights", color=SPARSITY)
    right.tick_params(axis="y", colors=SPARSITY)

    handles, labels = ax.get_legend_handles_labels()
    more_handles, more_labels = right.get_legend_handles_labels()
    # Below the axes, not over them: the curves are the point of the picture.
    fig.legend(handles + more_handles, labels + more_labels, loc="outside lower center", ncol=4, fontsize=8,
               frameon=False)
    ax.set_title(_title(report), fontsize=11)
    ax.grid(alpha=0.25)
    return fig


def layer_kind(name: str) -> str:
    """'attention', 'mlp' or 'other', from the module path of a weight."""
    parts = name.lower().split(".")
    if any("attn" in p or "attention" in p for p in parts):
        return "attention"
    mlp_names = {"ffn", "feed_forward", "fc1", "fc2", "c_fc", "gate_proj", "up_proj", "down_proj",
                 "w1", "w2", "w3", "dense_h_to_4h", "dense_4h_to_h"}
    if any("mlp" in p or p in mlp_names for p in parts):
        return "mlp"
    return "other"


def layer_block(name: str) -> tuple[int | None, str]:
    """The block index in a weight's path and the rest of it: ('...h.3.attn.c_attn.weight') -> (3, 'attn.c_attn')."""
    match = re.search(r"(?:^|\.)(\d+)\.(.+)$", name)
    short = re.sub(r"\.weight$", "", match.group(2) if match else name)
    return (int(match.group(1)) if match else None), short


def layers_figure(report: dict):
    """Sparsity of every pruned weight matrix, in model order, grouped by transformer block."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import PercentFormatter

    layers = report["sparsity"]["layers"]
    target = report["recipe"]["prune"]["sparsity"]
    reached = report["sparsity"]["prunable_sparsity"]
    n = len(layers)
    fig = Figure(figsize=(min(24.0, max(8.0, 2.0 + 0.09 * n)), 4.8), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()

    # Model order, with a gap between blocks so that each block reads as a group.
    positions, blocks, x, previous = [], [], 0.0, object()
    for layer in layers:
        block, _ = layer_block(layer["name"])
        if positions and block != previous:
            x += 0.8
        positions.append(x)
        blocks.append(block)
        previous = block
        x += 1.0
    colours = {"attention": ATTENTION, "mlp": MLP, "other": OTHER}
    kinds = [layer_kind(layer["name"]) for layer in layers]
    ax.bar(positions, [layer["sparsity"] for layer in layers], width=0.85,
           color=[colours[k] for k in kinds], edgecolor="none")

    groups: dict = {}
    for pos, block in zip(positions, blocks):
        groups.setdefault(block, []).append(pos)
    for i, (block, where) in enumerate(groups.items()):
        if i % 2:
            ax.axvspan(where[0] - 0.7, where[-1] + 0.7, color="#000000", alpha=0.04, zorder=0)
    if n <= 40:
        ax.set_xticks(positions, [layer_block(layer["name"])[1] for layer in layers], rotation=90, fontsize=7)
        for block, where in groups.items():
            ax.annotate("" if block is None else f"block {block}", ((where[0] + where[-1]) / 2, 1.0),
                        xycoords=("data", "axes fraction"), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8)
        ax.set_xlabel("pruned weight matrix, in model order")
    else:
        labelled = [(b, w) for b, w in groups.items() if b is not None]
        every = max(1, len(labelled) // 30)
        ax.set_xticks([(w[0] + w[-1]) / 2 for b, w in labelled[::every]],
                      [str(b) for b, w in labelled[::every]], fontsize=8)
        ax.set_xlabel("transformer block (pruned weight matrices in model order)")
    ax.set_xlim(-1, x)

    target_line = ax.axhline(target, color="#d62728", linestyle="--", linewidth=1.2,
                             label=f"global target {target:.0%} (reached {reached:.2%})")
    top = max([layer["sparsity"] for layer in layers] + [target])
    ax.set_ylim(0, min(1.02, top * 1.1 + 0.02))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_ylabel("sparsity (fraction of zeros)")
    ax.grid(axis="y", alpha=0.25)
    legend = [Patch(color=colours[k], label=k if k != "mlp" else "MLP") for k in ("attention", "mlp", "other")
              if k in kinds]
    legend.append(target_line)
    fig.legend(handles=legend, loc="outside lower center", fontsize=8, frameon=False, ncol=len(legend))
    fig.suptitle(f"Sparsity of each pruned weight matrix ({n} matrices in {len(groups)} blocks)\n"
                 f"{_title(report)}", fontsize=10)
    return fig


def write_plots(folder: Path, report: dict, log: dict) -> tuple[dict[str, str], list[str]]:
    """Draw both plots into `folder`: ({kind: file name}, [one line per plot skipped])."""
    reason = plots_available()
    if reason:
        return {}, [reason]
    written, skipped = {}, []
    for kind, make in (("training", lambda: training_figure(log, report)), ("layers", lambda: layers_figure(report))):
        try:
            make().savefig(Path(folder) / PLOT_FILES[kind])
        except Exception as exc:  # a plot is a by-product: it never costs the user a finished run
            skipped.append(f"{PLOT_FILES[kind]} skipped: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
        else:
            written[kind] = PLOT_FILES[kind]
    return written, skipped
