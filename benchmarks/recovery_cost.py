"""What the pruning and TA machinery costs: step time and peak memory against plain AdamW.

Both configurations run tapc's `train` on the same model, batch and recipe; each run is
its own spawned process, so its peak resident memory is its own (a process never gives
freed memory back reliably, so two runs in one process would not compare). Runs
alternate (AdamW, pruning+TA, AdamW, ...) so that a change in the load of a shared
machine hits both alike; the ratios use the median over repeats.

Step time is split in two: the steady step (forward, backward, Taylor scores, masked
gradients, TA term) and the mask update (global threshold over all scores), which
happens once every `prune_every` steps; the amortized time adds one update per
`prune_every` steps, the rate of the recipe.

With a teacher loss (`--peers --loss kd`, id `cost-kd`) every configuration distils from
a frozen dense copy, as the shipped recipes do, and a third one adds `prune.score_loss:
ce` (one more cross-entropy forward and backward of the student on every scoring step), and a
fourth the steady step that does not score (`prune.score_steps`: only the steps just before an
update pay for the scores).
"""

from __future__ import annotations

import copy
import multiprocessing
import statistics
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM

from compressor.distill import uses_teacher
from compressor.pruner import Pruner
from compressor.recipe import validate_recipe
from compressor.train import build_optimizer, train

from .recovery_methods import Method

PAGE = 4096


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Samples this process's resident memory every few milliseconds in a thread."""

    def __init__(self, every: float = 0.002):
        self.every, self.peak, self._stop = every, _rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _child(conn, config, state_path, train_windows, recipe_json, prune, steps, threads):
    torch.set_num_threads(threads)
    # A .gguf checkpoint leaves a quantization config behind although its weights are
    # float32 by now; the copy here is a plain float model.
    if getattr(config, "quantization_config", None) is not None:
        config = copy.deepcopy(config)
        del config.quantization_config

    def load():
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(torch.load(state_path, weights_only=True), strict=False)
        model.tie_weights()
        return model

    model, recipe = load(), validate_recipe(recipe_json)
    teacher = load().eval().requires_grad_(False) if uses_teacher(recipe.train) else None
    seconds = []
    base = _rss()
    with PeakRSS() as peak:
        pruner = Pruner(recipe.prune, steps).prepare(model) if prune else None
        optimizer = build_optimizer(model, recipe, pruner, ref_loss=0.0)
        log = train(model, pruner, optimizer, train_windows, train_windows, recipe, steps, torch.device("cpu"),
                    progress=lambda e: seconds.append(e["seconds"]), teacher=teacher)
    durations = [b - a for a, b in zip([0.0] + seconds, seconds)]
    conn.send({"durations": durations, "update_steps": [u["step"] for u in log.mask_updates],
               "base_rss": base, "peak_rss": peak.peak})


def _run_child(ctx, args) -> dict:
    """One measurement in a fresh spawned process, or in this one when `ctx` is None."""
    if ctx is None:
        got = []
        _child(SimpleNamespace(send=got.append), *args)
        return got[0]
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, *args))
    proc.start()
    child.close()
    result = parent.recv()
    proc.join()
    return result


def _summary(run: dict, prune_every: int) -> dict:
    updates = set(run["update_steps"])
    # Step 1 warms up; a KD run only scores until its first mask (the student is its teacher).
    first = min(updates, default=1)
    steady = [d for i, d in enumerate(run["durations"], 1) if i > first and i not in updates]
    step = statistics.median(steady)
    update = statistics.fmean(run["durations"][i - 1] for i in updates) - step if updates else 0.0
    return {"step_s": step, "update_extra_s": update, "amortized_s": step + update / prune_every,
            "peak_rss": run["peak_rss"], "train_rss": run["peak_rss"] - run["base_rss"]}


def measure(bench, method, recipe_for, log, isolate: bool = True) -> dict:
    """Median step time and peak memory of pruning+TA over plain AdamW, as ratios.

    `isolate=False` (the quick mode in the test suite) runs in this process to save the
    seconds a spawn costs: the times still compare, the memory figures do not.
    """
    s = bench.settings
    steps = s.cost_steps
    plain = recipe_for(bench, Method("", "", "finetune", 0.0, {"ta.enabled": False, "train.steps": steps}))
    # Prune through the whole run (final = 1.0) so that every step pays for the scores,
    # and update the mask every 3 steps so that a few updates are timed.
    over = {"train.steps": steps, "prune.sparsity": method.sparsity, "prune.warmup": 0.0, "prune.final": 1.0,
            "prune.prune_every": 3, "ta.enabled": True, "ta.lr": 1e-2}
    tapc = lambda **more: recipe_for(bench, Method("", "", "prune", method.sparsity, {**over, **more}))  # noqa: E731
    configs = {"adamw": (plain, False), "prune+ta": (tapc(**{"prune.score_loss": "train"}), True)}
    if uses_teacher(plain.train):
        configs["prune+ta, CE scores"] = (tapc(**{"prune.score_loss": "ce"}), True)
        # `prune.score_steps: 1`: only the update steps score, so the steady step is one that does not.
        configs["prune+ta, no scores"] = (tapc(**{"prune.score_loss": "ce", "prune.score_steps": 1}), True)
    ctx = multiprocessing.get_context("spawn") if isolate else None
    runs = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        state_path = Path(tmp) / "state.pt"
        torch.save(bench.model.state_dict(), state_path)
        batch = bench.train_windows[: steps * s.batch_size + s.batch_size]
        for r in range(s.cost_repeats):
            for name, (recipe, prune) in configs.items():
                log(f"  cost: {name} run {r + 1}/{s.cost_repeats}, {steps} steps")
                raw = _run_child(ctx, (bench.model.config, state_path, batch, recipe.model_dump(mode="json"),
                                       prune, steps, torch.get_num_threads()))
                runs[name].append(_summary(raw, s.prune_every))
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    a, b = med["adamw"], med["prune+ta"]
    return {
        "id": method.id, "label": method.label, "kind": "cost", "sparsity": method.sparsity,
        "settings": s.fingerprint("cost"), "model": bench.model_label, "steps": steps, "repeats": s.cost_repeats,
        "loss": plain.train.loss,
        "isolated": isolate,
        "prune_every": s.prune_every, "runs": runs, "median": med,
        "ratios": {"step_time": b["step_s"] / a["step_s"], "amortized_step_time": b["amortized_s"] / a["step_s"],
                   "peak_memory": b["peak_rss"] / a["peak_rss"], "training_memory": b["train_rss"] / a["train_rss"]},
    }
