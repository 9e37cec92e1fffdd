"""The recovery benchmark's rows: each method's id, label, kind and recipe overrides.

`benchmarks/recovery.py` plans and runs them, `recovery_cost.py` builds its two
configurations from them, `recovery_report.py` finds the default job's row by them; this
module imports none of those.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compressor.recipe import load_recipe


@dataclass
class Method:
    id: str
    label: str
    kind: str  # dense | oneshot | finetune | prune | shock (prune at once, then recover) | calibrated (SparseGPT,
    #          per-row Wanda) | calibrated-train (trained from a calibrated mask)
    sparsity: float = 0.0
    overrides: dict = field(default_factory=dict)  # recipe overrides (dotted keys)
    saliency: str = ""  # oneshot only


# quick-cpu's lr and warmup before its tables by sparsity: every row runs with these unless its id names others
PINNED = {"optim.lr": 2e-4, "prune.warmup": 0.1}


def sid(s: float) -> str:
    return f"s{round(s * 100)}"


def lr_id(lr: float) -> str:
    return f"lr{lr:g}"


def taylor(sparsity: float, lr: float, ta_lr: float | None = None, **ta) -> Method:
    """Dynamic Taylor pruning (the schedule of docs/method.md, regrowth) with AdamW or with the TA term.

    Scores from the training loss's gradient, as every run did before `prune.score_loss: ce` became the default
    (the same under cross-entropy; under KD the CE-scored rows are `scored_by_ce`)."""
    over = {"optim.lr": lr, "prune.sparsity": sparsity, "prune.score_loss": "train"}
    if ta_lr is None:
        over["ta.enabled"] = False
        return Method(f"{sid(sparsity)}-taylor-adamw-{lr_id(lr)}", "dynamic Taylor + AdamW", "prune", sparsity, over)
    over.update({"ta.enabled": True, "ta.lr": ta_lr, **{f"ta.{k}": v for k, v in ta.items()}})
    tag = "-".join(f"{k}-{v}" for k, v in ta.items())
    label = "dynamic Taylor + TA " + (f"(eta_TA={ta_lr:g}" + "".join(f", {k}={v}" for k, v in ta.items()) + ")")
    return Method(f"{sid(sparsity)}-taylor-ta{ta_lr:g}{'-' + tag if tag else ''}-{lr_id(lr)}", label, "prune",
                  sparsity, over)


def shock(sparsity: float, lr: float, ta_lr: float | None = None) -> Method:
    """The whole target at step 1 by global magnitude, then recovery with the mask fixed.

    Dynamic Taylor pruning in small steps barely moves the loss (see the probe columns),
    so this is the test of TA's claim with damage to repair: the one-shot magnitude mask
    of baseline 3, then AdamW or TA, the probe following the loss for `shock_window` steps.
    """
    base = taylor(sparsity, lr, ta_lr)
    over = {**base.overrides, "prune.saliency": "magnitude", "prune.warmup": 0.0,
            "prune.final": 1 / 1000, "prune.regrowth": False}  # final step = step 1, at any budget
    label = "one-shot magnitude at step 1, then " + base.label.removeprefix("dynamic Taylor + ")
    return Method(base.id.replace("-taylor-", "-shock-"), label, "shock", sparsity, over)


def gmp(sparsity: float, lr: float) -> Method:
    # Gradual magnitude pruning (Zhu & Gupta): cubic ramp, pruned weights stay pruned.
    over = {"optim.lr": lr, "prune.sparsity": sparsity, "prune.saliency": "magnitude", "prune.schedule": "cubic",
            "prune.regrowth": False, "ta.enabled": False}
    return Method(f"{sid(sparsity)}-gmp-adamw-{lr_id(lr)}", "gradual magnitude (cubic) + AdamW", "prune",
                  sparsity, over)


def finetune(lr: float) -> Method:
    return Method(f"dense-finetune-{lr_id(lr)}", "dense fine-tuned (ceiling)", "finetune", 0.0,
                  {"optim.lr": lr, "ta.enabled": False})


PEERS = {"sparsegpt": "SparseGPT", "wanda": "Wanda (per row)"}


def peer(sparsity: float, method: str, lr: float | None = None, ta_lr: float | None = None, **ta) -> Method:
    """A one-shot peer (lr None), or the peer then AdamW / TA for the budget with its mask fixed."""
    over = {"prune.sparsity": sparsity, "prune.method": method}
    if lr is None:
        return Method(f"{sid(sparsity)}-{method}", f"{PEERS[method]} one-shot", "calibrated", sparsity, over)
    over.update({"optim.lr": lr, "ta.enabled": ta_lr is not None, "ta.lr": ta_lr, **{f"ta.{k}": v for k, v in ta.items()}})
    opt = "AdamW" if ta_lr is None else f"TA (eta_TA={ta_lr:g}" + "".join(f", {k}={v}" for k, v in ta.items()) + ")"
    tag = "adamw" if ta_lr is None else f"ta{ta_lr:g}" + "".join(f"-{k}-{v}" for k, v in ta.items())
    return Method(f"{sid(sparsity)}-{method}-{tag}-{lr_id(lr)}", f"{PEERS[method]}, then {opt}, mask fixed",
                  "calibrated-train", sparsity, over)


def scored_by_ce(base: Method, **prune) -> Method:
    """A tapc row (`taylor`, `started`) trained by distillation with Taylor scores from the CE gradient
    (`prune.score_loss: ce`). `prune` replaces recipe fields of that section (`warmup`: 0.1; under KD
    from a dense start the gradient is zero until the first mask; `stability`: 1.0)."""
    over, label = {**base.overrides, "prune.score_loss": "ce"}, base.label
    over.update({f"prune.{k}": v for k, v in prune.items()})
    said = {"warmup": "pruning from {:.0%} of the run", "stability": "stability factor lambda {:g}",
            "score_steps": "scoring the last {} steps before each mask update"}
    label = ", ".join([label, *(said[k].format(v) for k, v in prune.items())])
    mid = "-taylor-cescore-" + "".join(f"{k}{v:g}-" for k, v in prune.items())
    return Method(base.id.replace("-taylor-", mid), f"{label}, scores from the CE gradient", base.kind,
                  base.sparsity, over)


def started(sparsity: float, method: str, lr: float, ta_lr: float | None) -> Method:
    """tapc's dynamic job (Taylor scores, regrowth) whose first mask is a one-shot peer's."""
    base = taylor(sparsity, lr, ta_lr)
    return Method(base.id.replace("-taylor-", f"-{method}-start-taylor-"),
                  f"{base.label} from the {PEERS[method]} mask", "calibrated-train", sparsity,
                  {**base.overrides, "prune.start": method})


def default(sparsity: float, **ta_lr) -> Method:
    """tapc's default job at `sparsity` (KD): quick-cpu's lr and warmup read from its tables by sparsity.

    `ta_lr=X` replaces the recipe's eta_TA (None: plain AdamW), the rest of the job as it is."""
    recipe = load_recipe("quick-cpu", {"prune.sparsity": sparsity})
    warmup = {} if recipe.prune.warmup == PINNED["prune.warmup"] else {"warmup": recipe.prune.warmup}
    return scored_by_ce(taylor(sparsity, recipe.optim.lr, ta_lr.get("ta_lr", recipe.ta.lr)), **warmup)
