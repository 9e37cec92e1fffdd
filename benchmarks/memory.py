"""Is tapc's memory estimate within 25% of the measured peak?

    python -m benchmarks.memory                       # SmolLM2-135M, 1 x 256 and 4 x 256, ce and kd
    python -m benchmarks.memory --batches 1 --losses ce
    python -m benchmarks.memory --reestimate          # the stored measurements against today's formula

Each setting is `compress` in its own process (quick-cpu, a few steps, no exports), so
the peak resident memory (`ru_maxrss`) is that run's alone; it is read when training
ends (peak of loading and training) and at the end (evaluations too), and set beside
`compressor.memory.estimate_for` for the same model and recipe.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
from pathlib import Path

from compressor import compress, load_recipe
from compressor.memory import GB, estimate_for, meta_model
from compressor.testing import smollm2_gguf

from .recovery import DATA


def _recipe(batch: int, loss: str):
    return load_recipe("quick-cpu", {
        "train.steps": 6, "train.batch_size": batch, "train.loss": loss, "train.checkpoint_every": 0,
        "train.eval_every": 0, "data.dataset": str(DATA), "eval.max_tokens": 4096, "device": "cpu",
        "export.onnx": False, "export.quantize": [], "export.sparse": False,
    })


def _child(model: str, batch: int, loss: str, out: str, queue) -> None:
    marks = {}

    def progress(event):
        stage = event.get("stage")
        if stage == "eval-pruned" and "trained" not in marks:
            marks["trained"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if stage == "load" and "start" not in marks:
            marks["start"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    compress(model, _recipe(batch, loss), out, overwrite=True, progress=progress)
    marks["end"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put(marks)


def measure(model: str, batch: int, loss: str, out: Path) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(model, batch, loss, str(out / f"b{batch}-{loss}"), queue))
    proc.start()
    marks = queue.get()
    proc.join()
    return with_estimate(model, {"batch": batch, "seq_len": 256, "loss": loss, "measured_train_peak": marks["trained"],
                                 "measured_peak": marks["end"]})


def with_estimate(model: str, row: dict) -> dict:
    est = estimate_for(meta_model(model), _recipe(row["batch"], row["loss"]))
    train_est = sum(est.train.values())
    return {**row, "estimate_train": train_est, "estimate_peak": est.peak,
            "error_train": train_est / row["measured_train_peak"] - 1,
            "error_peak": est.peak / row["measured_peak"] - 1,
            "parts": est.train, "eval_parts": est.eval}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--losses", default="ce,kd")
    parser.add_argument("--runs", default="/tmp/tapc-memory")
    parser.add_argument("--out", default="benchmarks/results/memory-estimate.json")
    parser.add_argument("--reestimate", action="store_true", help="recompute the estimates of the stored rows")
    args = parser.parse_args(argv)
    model = args.model or str(smollm2_gguf())
    if args.reestimate:
        rows = [with_estimate(model, r) for r in json.loads(Path(args.out).read_text())]
    else:
        rows = [measure(model, int(b), loss, Path(args.runs)) for b in args.batches.split(",")
                for loss in args.losses.split(",")]
    Path(args.out).write_text(json.dumps(rows, indent=1))
    for r in rows:
        print(f"{r['batch']} x 256 {r['loss']:<5}  measured {r['measured_train_peak'] / GB:.2f} GB (train), "
              f"{r['measured_peak'] / GB:.2f} GB (all); estimate {r['estimate_train'] / GB:.2f} / "
              f"{r['estimate_peak'] / GB:.2f} GB; error {r['error_train']:+.1%} / {r['error_peak']:+.1%}")


if __name__ == "__main__":
    main()
