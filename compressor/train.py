"""The recovery training loop: prune while training, then train with the mask fixed.

One optimizer step: `grad_accum` batches (each split into micro-batches of
`train.micro_batch` windows where memory requires) forward and backward (on the loss
`train.loss` names: cross-entropy, distillation from the dense teacher, or both), gradients are
averaged across processes (when distributed), the pruner folds them into its scores
(masked weights included), masked gradients are zeroed, the global gradient norm is
clipped, the optimizer steps (TA needs the loss), the LR decays, and the pruner updates
the masks when its schedule says so.

Pure distillation (`train.loss: kd`) from the dense model has nothing to learn until the
first weights are masked: the student is its teacher, the loss is 0 and its gradient is
only the rounding of two softmaxes, which Adam would scale up into lr-sized random steps
(and Taylor scores of noise). Until the first mask update these steps therefore score
with the cross-entropy gradient (the thesis' loss) and leave the weights alone; the log
records their loss as 0, the KD loss of a model equal to its teacher. The learning-rate
schedule counts them (it is a function of the step), so a warmup of optim.warmup_steps
may be spent before the first weight moves.

Everything a step depends on is either in `Trainer.state_dict()` or a pure function of
the step number (the batch order), so a run restored from a checkpoint continues
exactly as if it had never stopped.
"""

from __future__ import annotations

import enum
import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from . import distributed as dist
from .distill import dense_loss, recovery_loss, uses_teacher
from .errors import JobError
from .evaluate import mean_loss
from .memory import micro_batch
from .optim import TAAdamW
from .pruner import Pruner
from .recipe import Recipe


@dataclass
class TrainLog:
    steps: int
    tokens: int = 0
    seconds: float = 0.0
    loss: list[float] = field(default_factory=list)  # the training loss (train.loss) per step
    lr: list[float] = field(default_factory=list)
    sparsity: list[float] = field(default_factory=list)  # masked fraction after each step
    ta_coef: list[float] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)  # {"step", "loss"}
    mask_updates: list[dict] = field(default_factory=list)
    recoveries: list[dict] = field(default_factory=list)  # non-finite losses survived
    state_bytes: int = 0  # training state this process held at the end (its shards, sharded)

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
        space=ta.space, before_clip=ta.before_clip,
        ref_loss=dense_loss(recipe.train, ref_loss) if ta.target == "reference" else None,
        masks=pruner.param_masks() if pruner else None,
        grads_masked=pruner is not None,  # Trainer.train_step masks them before clipping
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


class Scoring(enum.Enum):
    """Where a step's Taylor scores come from (`Trainer.scoring_plan`)."""

    TRAINING = "training"  # the training loss's gradient, when the pruner scores this step
    SCORE_ONLY = "score-only"  # a kd run still equal to its teacher: CE gradient into the scores, no weight step
    SHARED_PASS = "shared-pass"  # the CE gradient of the training pass's forward, then the training loss's
    OWN_PASS = "own-pass"  # the CE gradient of a forward and backward of their own, before the training pass


class BatchOrder:
    """Batch b of the run, as a pure function of b: epoch e uses permutation seed + e.

    No iterator state to save, so resuming at any step gives the same batches.
    """

    def __init__(self, windows: torch.Tensor, batch_size: int, seed: int):
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.per_epoch = len(windows) // batch_size
        self._epoch, self._order = -1, None

    def __call__(self, index: int) -> torch.Tensor:
        epoch, pos = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.windows), generator=gen)
        return self.windows[self._order[pos * self.batch_size : (pos + 1) * self.batch_size]]


class Trainer:
    """Runs the loop; `state_dict()` is everything a checkpoint needs to continue exactly."""

    def __init__(self, model, pruner: Pruner | None, optimizer: TAAdamW, train_windows: torch.Tensor,
                 val_windows: torch.Tensor, recipe: Recipe, steps: int, device: torch.device, teacher=None):
        cfg = recipe.train
        if uses_teacher(cfg) and teacher is None:
            raise ValueError(f"train.loss {cfg.loss} needs the dense model as teacher")
        world = dist.world_size()
        if cfg.batch_size % world:
            raise JobError(f"train.batch_size {cfg.batch_size} is not divisible by the {world} processes; "
                           "make it a multiple of the process count (--batch-size)")
        if len(train_windows) < cfg.batch_size:
            raise JobError(
                f"the training text gives {len(train_windows)} windows, fewer than a batch of "
                f"{cfg.batch_size}; use more text, a shorter --seq-len or a smaller batch"
            )
        self.model, self.pruner, self.optimizer, self.teacher = model, pruner, optimizer, teacher
        self.recipe, self.steps, self.device = recipe, steps, device
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, steps))
        self.batches = BatchOrder(train_windows, cfg.batch_size, recipe.seed)
        self.micro = micro_batch(recipe, world)
        if (cfg.batch_size // world) % self.micro:
            raise JobError(f"train.micro_batch {self.micro} does not divide the {cfg.batch_size // world} windows "
                           "each process runs per step; give a divisor of it")
        self.val = val_windows[: cfg.val_batches * cfg.batch_size]
        self.log = TrainLog(steps=steps)
        self.step = 0
        self.lr_scale = 1.0  # lowered after each recovery from a non-finite loss
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.sharded = any(dist.is_sharded(p) for p in self.params)  # FSDP2: it reduces the gradients itself
        self.autocast = recipe.train.mixed_precision == "bf16"
        self.score_before_first_mask = True  # see Scoring.SCORE_ONLY; a dry run times full steps instead
        self.ce = recipe.train.model_copy(update={"loss": "ce"})  # a pass that only scores trains nothing

    # -- one step ------------------------------------------------------------------------
    def scoring_plan(self, step: int) -> Scoring:
        """Where step `step`'s Taylor scores come from (see `Scoring`), decided once per step."""
        pruner, recipe = self.pruner, self.recipe
        if (self.score_before_first_mask and recipe.train.loss == "kd" and pruner is not None and not pruner.fixed
                and not pruner.history):
            return Scoring.SCORE_ONLY
        # Taylor scores from a gradient of their own (`prune.score_loss` ce under kd, or sampled) this step?
        kind = recipe.prune.score_loss
        if not (kind != "train" and not (kind == "ce" and recipe.train.loss == "ce") and pruner is not None
                and pruner.scoring(step)):
            return Scoring.TRAINING
        # One forward pass serves both gradients where its graph can be kept for a second backward: no
        # micro-batches, no gradient accumulation, and not FSDP2 (it frees its gathered weights after a backward).
        whole = self.micro == recipe.train.batch_size // dist.world_size()
        return Scoring.SHARED_PASS if recipe.train.grad_accum == 1 and whole and not self.sharded else Scoring.OWN_PASS

    def _forward_backward(self, step: int, plan: Scoring, scores_pass: bool = False) -> float:
        """The step's gradient in .grad under `plan`; returns its loss.

        The training pass takes the training loss's gradient, except under SCORE_ONLY (the score
        loss's, for the scores alone). The score loss is `prune.score_loss`'s: ce, or sampled; `train`
        scores with ce where the training loss cannot (SCORE_ONLY). Under SHARED_PASS the score loss's
        gradient of the same forward pass goes to the scores first, then the training loss's replaces
        it (one more backward, no forward). The `scores_pass` of OWN_PASS is a forward and backward of
        its own that reads the step's batch a second time (its tokens are not counted again). A
        gradient that only feeds the scores is taken for the pruned weights alone (not the embeddings:
        on a tied LM head, a vocabulary-sized product per token); the score backward of SHARED_PASS
        always is."""
        only_scores = scores_pass or plan is Scoring.SCORE_ONLY
        shared = plan is Scoring.SHARED_PASS and not scores_pass
        kind = "sampled" if self.recipe.prune.score_loss == "sampled" else "ce"
        generator = self.score_generator(step) if kind == "sampled" and (only_scores or shared) else None
        cfg, world, rank = self.ce if only_scores else self.recipe.train, dist.world_size(), dist.rank()
        # FSDP2 reduces each parameter's gradient in hooks of its own: left to them.
        scored = list(self.pruner.weights.values()) if self.pruner and not self.sharded else None
        per_rank = cfg.batch_size // world
        loss = 0.0
        for accumulated in range(cfg.grad_accum):
            batch = self.batches((step - 1) * cfg.grad_accum + accumulated)
            ids = batch[rank * per_rank : (rank + 1) * per_rank].to(self.device)
            # Micro-batches of equal size (a divisor of the batch): the mean of their mean losses is the batch's.
            parts = ids.split(self.micro)
            for part in parts:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    if only_scores:
                        micro_loss = recovery_loss(self.model, None, part, cfg, score=kind, generator=generator)[1]
                    else:
                        micro_loss = recovery_loss(self.model, self.teacher, part, cfg, score=kind if shared else None,
                                                   generator=generator)
                if shared:
                    micro_loss, scoring = micro_loss
                    scoring.backward(inputs=scored, retain_graph=True)
                    self._average(scoring.item())
                    self._score(step)
                share = cfg.grad_accum * len(parts)
                (micro_loss / share).backward(inputs=scored if only_scores else None)
                loss += micro_loss.item() / share
            if not scores_pass:
                self.log.tokens += batch.numel()
        return self._average(loss)

    def score_generator(self, step: int) -> torch.Generator:
        """The draws of step `step`'s sampled labels (`prune.score_loss: sampled`): a function of the seed,
        the step and the process, so a resumed run draws the same tokens."""
        seed = (self.recipe.seed * 1_000_003 + step) * 1009 + dist.rank()
        return torch.Generator(self.device).manual_seed(seed)

    def _score(self, step: int) -> None:
        """Fold the gradient in .grad (the score loss's) into the Taylor scores and clear it for the training gradient."""
        self.pruner.observe(step)
        self.optimizer.zero_grad(set_to_none=True)

    def _average(self, loss: float) -> float:
        # Every rank then holds the global gradient (sharded: its shard of it) and loss: scores,
        # masks and the TA term (global loss, global gradient norm) come out as on one process.
        if self.sharded:
            return dist.sum_shards([loss])[0] / dist.world_size()
        return dist.average_gradients(self.params, loss)

    def train_step(self) -> dict | None:
        """One optimizer step. Returns the mask update record, if any; raises on a bad loss."""
        step = self.step + 1
        self.optimizer.zero_grad(set_to_none=True)
        plan = self.scoring_plan(step)
        if plan is Scoring.OWN_PASS:
            self._forward_backward(step, plan, scores_pass=True)
            self._score(step)
        loss = self._forward_backward(step, plan)
        if not math.isfinite(loss):
            raise NonFiniteLoss(step, loss)
        if self.pruner:
            if plan in (Scoring.TRAINING, Scoring.SCORE_ONLY):  # the others scored in their passes
                self.pruner.observe(step, every_step=plan is Scoring.SCORE_ONLY)
            self.pruner.mask_gradients_()
        self.log.lr.append(self.optimizer.param_groups[0]["lr"])
        if plan is Scoring.SCORE_ONLY:
            loss = 0.0  # the KD loss of a model equal to its teacher
            self.optimizer.last_ta = {}
        else:
            norm, unclipped, clip = None, None, self.recipe.optim.grad_clip
            if clip:
                # The norms before and after clipping are what the TA term needs: known here for
                # free (tensors: the optimizer reads them only when TA is on, so AdamW never syncs).
                unclipped = dist.clip_grad_norm_(self.params, clip)
                norm = unclipped.clamp(max=clip)
            self.optimizer.step(loss=loss, grad_norm=norm, unclipped_norm=unclipped)
        with warnings.catch_warnings():  # a scoring-only first step: the schedule still counts it
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        log = self.log
        log.loss.append(loss)
        # The stability signal starts with the first loss there is to stabilise.
        first = log.mask_updates[0]["step"] if self.recipe.train.loss == "kd" and log.mask_updates else 0
        recent = log.loss[max(first, len(log.loss) - self.recipe.prune.loss_window):]
        update = self.pruner.step(step, recent) if self.pruner else None
        if update:
            log.mask_updates.append(update)
        log.sparsity.append(self.pruner.current_sparsity if self.pruner else 0.0)
        log.ta_coef.append(self.optimizer.last_ta.get("coef", 0.0))
        every = self.recipe.train.eval_every
        if every and (step % every == 0 or step == self.steps) and len(self.val):
            log.validation.append({"step": step, "loss": mean_loss(self.model, self.val, self.micro,
                                                                   self.device)})
        self.step = step
        return update

    def state_bytes(self) -> int:
        """Bytes of training state this process holds: weights and masks, gradients, optimizer moments,
        Taylor scores, the teacher (sharded: this process's shards of each)."""
        models = [self.model] + ([self.teacher] if self.teacher is not None else [])
        params = [p for m in models for p in m.parameters()]
        tensors = [dist.local(p) for p in params] + [dist.local(p.grad) for p in params if p.grad is not None]
        tensors += [t for state in self.optimizer.state.values() for t in state.values() if t.dim()]
        tensors += list(self.pruner.scores.values()) if self.pruner else []
        return sum(t.numel() * t.element_size() for t in tensors)

    def set_lr_scale(self, scale: float) -> None:
        """Scale the learning rate and the TA step size (relative to the recipe's) from now on."""
        factor, self.lr_scale = scale / self.lr_scale, scale
        self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
            group["initial_lr"] *= factor
        self.optimizer.ta["lr"] *= factor

    # -- checkpoint state ----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "lr_scale": self.lr_scale,
            "model": {k: dist.local(v) for k, v in self.model.state_dict().items()},  # sharded: this process's rows
            "pruner": self.pruner.state_dict() if self.pruner else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "log": self.log.to_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: dict) -> None:
        if self.sharded:  # the same processes wrote it: each copies its own shards back
            current = self.model.state_dict()
            if current.keys() != state["model"].keys():
                raise ValueError("checkpoint shard belongs to a model with other weights")
            with torch.no_grad():
                for key, value in current.items():
                    dist.local(value).copy_(state["model"][key])
        else:
            self.model.load_state_dict(state["model"])
        if self.pruner:
            self.pruner.load_state_dict(state["pruner"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.log = TrainLog(**state["log"])
        self.step = state["step"]
        self.lr_scale = state["lr_scale"]
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])


class NonFiniteLoss(JobError):
    def __init__(self, step: int, loss: float):
        super().__init__(f"training loss became {loss} at step {step}")
        self.step = step


def run(trainer: Trainer, *, progress=None, checkpoint=None, restore=None, stop=None) -> TrainLog:
    """Train to the end, checkpointing and recovering as the recipe says.

    `checkpoint(trainer)` saves the state, `restore(trainer)` reloads the last saved state
    (None: no checkpoints), `stop()` tells whether a stop was requested (a signal).
    """
    cfg = trainer.recipe.train
    start = time.perf_counter() - trainer.log.seconds
    trainer.model.train()
    while trainer.step < trainer.steps:
        try:
            update = trainer.train_step()
        except NonFiniteLoss as exc:
            tries = len(trainer.log.recoveries)
            if restore is None or tries >= cfg.max_recoveries:
                hint = ("lower optim.lr or ta.lr in the recipe" if restore else
                        "lower optim.lr or ta.lr, or set --checkpoint-every so tapc can roll back")
                raise JobError(f"{exc} after {tries} recoveries; {hint}") from None
            recoveries = trainer.log.recoveries + [{"step": exc.step, "restored_to": None}]
            restore(trainer)
            trainer.set_lr_scale(0.5 ** len(recoveries))
            recoveries[-1]["restored_to"] = trainer.step
            trainer.log.recoveries = recoveries
            if progress:
                progress({"stage": "train", "recovery": recoveries[-1]})
            continue
        step = trainer.step
        trainer.log.seconds = time.perf_counter() - start
        log = trainer.log
        if progress:
            progress({
                "stage": "train", "step": step, "total": trainer.steps, "loss": log.loss[-1],
                "sparsity": log.sparsity[-1], "lr": log.lr[-1], "seconds": log.seconds,
                "eta": log.seconds / len(log.loss) * (trainer.steps - step),
                "mask_update": update,
                "validation": log.validation[-1] if log.validation and log.validation[-1]["step"] == step else None,
            })
        if checkpoint and step < trainer.steps and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            checkpoint(trainer)
        if stop and dist.any_rank(stop()) and step < trainer.steps:
            if checkpoint:
                checkpoint(trainer)
            raise Interrupted(step)
    trainer.model.eval()
    trainer.log.state_bytes = trainer.state_bytes()
    return trainer.log


class Interrupted(JobError):
    """A requested stop (SIGINT/SIGTERM) after a checkpoint was written."""

    exit_code = 130

    def __init__(self, step: int, how_to_resume: str = ""):
        super().__init__(f"interrupted at step {step}" + (f"; {how_to_resume}" if how_to_resume else ""))
        self.step = step


def train(model, pruner: Pruner | None, optimizer: TAAdamW, train_windows: torch.Tensor, val_windows: torch.Tensor,
          recipe: Recipe, steps: int, device: torch.device, progress=None, teacher=None) -> TrainLog:
    """The whole loop in one call, without checkpoints (benchmarks and library users)."""
    return run(Trainer(model, pruner, optimizer, train_windows, val_windows, recipe, steps, device, teacher),
               progress=progress)
