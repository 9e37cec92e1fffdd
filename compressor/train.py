"""The recovery training loop: prune while training, then train with the mask fixed.

One optimizer step: `grad_accum` micro-batches forward and backward, the pruner folds
the gradients into its scores (masked weights included), masked gradients are zeroed,
the global gradient norm is clipped, the optimizer steps (TA needs the loss), the LR
decays, and the pruner updates the masks when its schedule says so.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .errors import JobError
from .evaluate import mean_loss
from .optim import TAAdamW
from .pruner import Pruner
from .recipe import Recipe


@dataclass
class TrainLog:
    steps: int
    tokens: int = 0
    seconds: float = 0.0
    loss: list[float] = field(default_factory=list)  # training loss per step
    lr: list[float] = field(default_factory=list)
    sparsity: list[float] = field(default_factory=list)  # masked fraction after each step
    ta_coef: list[float] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)  # {"step", "loss"}
    mask_updates: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def total_steps(recipe: Recipe, num_windows: int) -> int:
    if recipe.train.steps is not None:
        return recipe.train.steps
    per_step = recipe.train.batch_size * recipe.train.grad_accum
    return max(1, math.ceil(recipe.train.epochs * num_windows / per_step))


def build_optimizer(model, recipe: Recipe, pruner: Pruner | None, ref_loss: float | None) -> TAAdamW:
    o, ta = recipe.optim, recipe.ta
    ta_lr = (o.lr if ta.lr is None else ta.lr) if ta.enabled else 0.0
    return TAAdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
        ta_lr=ta_lr, gamma=ta.gamma, beta=ta.beta, ta_eps=ta.eps, clip=ta.clip, k=ta.k,
        space=ta.space, ref_loss=ref_loss if ta.target == "reference" else None,
        masks=pruner.param_masks() if pruner else None,
    )


def lr_lambda(recipe: Recipe, steps: int):
    warm = recipe.optim.warmup_steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if recipe.optim.lr_schedule == "constant":
            return 1.0
        return max(0.0, (steps - step) / max(1, steps - warm))

    return factor


def _batches(windows: torch.Tensor, batch_size: int, seed: int):
    """Endless shuffled batches of windows; each epoch a new permutation from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(windows), generator=gen)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield windows[order[i : i + batch_size]]


def train(
    model,
    pruner: Pruner | None,
    optimizer: TAAdamW,
    train_windows: torch.Tensor,
    val_windows: torch.Tensor,
    recipe: Recipe,
    steps: int,
    device: torch.device,
    progress=None,
) -> TrainLog:
    cfg = recipe.train
    if len(train_windows) < cfg.batch_size:
        raise JobError(
            f"the training text gives {len(train_windows)} windows, fewer than a batch of "
            f"{cfg.batch_size}; use more text, a shorter --seq-len or a smaller batch"
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, steps))
    batches = _batches(train_windows, cfg.batch_size, recipe.seed)
    val = val_windows[: cfg.val_batches * cfg.batch_size]
    recent = deque(maxlen=recipe.prune.loss_window)
    log = TrainLog(steps=steps)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    start = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        for _ in range(cfg.grad_accum):
            ids = next(batches).to(device)
            out = model(input_ids=ids, labels=ids)
            (out.loss / cfg.grad_accum).backward()
            loss += out.loss.item() / cfg.grad_accum
            log.tokens += ids.numel()
        if not math.isfinite(loss):
            raise JobError(
                f"training loss became {loss} at step {step}; lower optim.lr or ta.lr in the recipe"
            )
        if pruner:
            pruner.observe(step)
            pruner.mask_gradients_()
        if recipe.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, recipe.optim.grad_clip)
        log.lr.append(optimizer.param_groups[0]["lr"])
        optimizer.step(loss=loss)
        scheduler.step()
        recent.append(loss)
        update = pruner.step(step, recent) if pruner else None
        if update:
            log.mask_updates.append(update)
        log.loss.append(loss)
        log.sparsity.append(pruner.current_sparsity if pruner else 0.0)
        log.ta_coef.append(optimizer.last_ta.get("coef", 0.0))
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == steps) and len(val):
            log.validation.append({"step": step, "loss": mean_loss(model, val, cfg.batch_size, device)})
        log.seconds = time.perf_counter() - start
        if progress:
            progress({
                "stage": "train", "step": step, "total": steps, "loss": loss,
                "sparsity": log.sparsity[-1], "lr": log.lr[-1], "seconds": log.seconds,
                "eta": log.seconds / step * (steps - step), "mask_update": update,
                "validation": log.validation[-1] if log.validation and log.validation[-1]["step"] == step else None,
            })
    model.eval()
    return log
