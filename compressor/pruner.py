"""Dynamic pruning with a global threshold and regrowth, shaped like a torch optimizer.

    pruner = Pruner(config, total_steps).prepare(model)
    ...  loss.backward(); pruner.observe(); pruner.mask_gradients_(); opt.step()
    pruner.step(t, recent_losses)      # updates the masks when the schedule says so
    pruner.finalize()                  # bakes w * mask into the weights

Each prunable weight gets a parametrization `w -> w * mask` whose backward passes the
gradient straight through to `w`, masked or not. So a masked weight keeps its last
value and still gets a gradient, its Taylor score stays meaningful, and it can come
back when that score beats the global threshold (regrowth) -- with one boolean mask per
weight and no second copy of the weights. The masks are frozen parameters of the
parametrization (not buffers), so FSDP2 shards them with their weights.

Sharded (FSDP2, `sharding.py`): weights, gradients, scores and masks are each process's
rows; the pruner works on those and sums counts over the processes, so the threshold,
the tie-breaking and the masks are those of one process holding everything.
"""

from __future__ import annotations

import functools
import math
import time

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import distributed as dist
from .models import prunable_weights
from .oneshot import METHODS, prune_oneshot
from .patterns import check_divisible, input_dim, parse_pattern, selection_keys
from .recipe import PruneConfig
from .saliency import NEEDS_ACTIVATIONS, NEEDS_GRADIENT, get_criterion
from .schedule import get_schedule, stability
from .buffers import ScratchBuffers
from .structure import find_groups, plan_removal, removed_units, unit_masks, unit_scores

EXACT_SELECT_LIMIT = 1 << 24  # below this many scores a plain kthvalue is fast enough
SAMPLE_SIZE = 1 << 20


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, mask):
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class Mask(nn.Module):
    """Parametrization `w -> w * mask` with a straight-through gradient."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = nn.Parameter(mask, requires_grad=False)

    def forward(self, weight):
        return _StraightThrough.apply(weight, self.mask)


class _MaskedLinear(torch.autograd.Function):
    """`x @ (w * mask).T + b` whose backward recomputes `w * mask` instead of keeping it.

    The weight gradient is the straight-through one, `grad.T @ x` for every weight,
    masked or not (as through `_StraightThrough`). `transposed`: the weight is stored
    (in, out), as in GPT-2's Conv1D.
    """

    @staticmethod
    def forward(ctx, x, weight, mask, bias, workspace, transposed):
        masked = workspace.masked(weight, mask)
        y = nn.functional.linear(x, masked.t() if transposed else masked, bias)
        ctx.save_for_backward(x, weight, mask)
        ctx.workspace, ctx.transposed = workspace, transposed
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, mask = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            masked = ctx.workspace.masked(weight, mask).to(g.dtype)
            dx = (g @ (masked.t() if ctx.transposed else masked)).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            xs = x.reshape(-1, x.shape[-1]).to(g.dtype)
            dw = (xs.t() @ g if ctx.transposed else g.t() @ xs).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
            db = g.sum(0).to(ctx.bias_dtype)
        return dx, dw, None, db, None, None


def _masked_forward(module: nn.Module, workspace: ScratchBuffers, transposed: bool, x: torch.Tensor) -> torch.Tensor:
    weight = module.parametrizations.weight
    return _MaskedLinear.apply(x, weight.original, weight[0].mask, module.bias, workspace, transposed)


def _total(counts: list[int], sharded: bool) -> list[int]:
    return dist.sum_shards(counts) if sharded else counts


def kth_smallest(scores: list[torch.Tensor], k: int, seed: int = 0, sharded: bool = False) -> float:
    """The k-th smallest value (1-based) over many tensors, exactly, without sorting them all.

    A random sample brackets the answer in a narrow band [lo, hi]; counting the values
    below lo and selecting inside the band gives the exact order statistic. This is far
    faster than `kthvalue` over 10^8 values (~1 s instead of ~8 s).
    `sharded`: the tensors are this process's shards; the sample, the counts and the band
    are combined over the processes (never all the scores).
    """
    n = _total([sum(s.numel() for s in scores)], sharded)[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside 1..{n}")
    gather = dist.gather_cat if sharded else (lambda t: t)
    if n <= EXACT_SELECT_LIMIT and not sharded:
        return torch.cat([s.flatten() for s in scores]).kthvalue(k).values.item()
    gen = torch.Generator(device=scores[0].device).manual_seed(seed + dist.rank() if sharded else seed)
    sample = gather(torch.cat([
        s.flatten()[torch.randint(s.numel(), (max(1, SAMPLE_SIZE * s.numel() // n),), generator=gen, device=s.device)]
        for s in scores if s.numel()
    ] or [scores[0].flatten()])).sort().values
    q, m = k / n, sample.numel()
    margin = 4.0 * math.sqrt(q * (1 - q) / m) + 2.0 / m
    for _ in range(4):
        lo = sample[max(0, int((q - margin) * m))].item()
        hi = sample[min(m - 1, int(math.ceil((q + margin) * m)))].item()
        below, upto = _total([sum(int((s < lo).sum()) for s in scores),
                              sum(int((s <= hi).sum()) for s in scores)], sharded)
        if below < k <= upto:
            band = gather(torch.cat([s[(s >= lo) & (s <= hi)] for s in scores]))
            return band.kthvalue(k - below).values.item()
        margin *= 4
    return gather(torch.cat([s.flatten() for s in scores])).kthvalue(k).values.item()


def global_masks(scores: list[torch.Tensor], k: int, seed: int = 0, sharded: bool = False) -> list[torch.Tensor]:
    """Boolean keep-masks that drop exactly the k lowest scores over all tensors together.

    Ties at the threshold are broken in tensor order (and, sharded, within a tensor in the
    order of its rows: process 0's first), so the count is exact and one process holding
    whole tensors gets the same masks.
    """
    if k <= 0:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    threshold = kth_smallest(scores, k, seed, sharded)
    remaining = k - _total([sum(int((s < threshold).sum()) for s in scores)], sharded)[0]
    ties = torch.tensor([int((s == threshold).sum()) for s in scores])
    # ties[r, i]: process r's ties in tensor i; taken tensor by tensor, process by process.
    ties = dist.gather_cat(ties).view(-1, len(scores)) if sharded else ties.view(1, -1)
    me = dist.rank() if sharded else 0
    masks = []
    for i, s in enumerate(scores):
        keep = s > threshold
        for r in range(ties.shape[0]):
            take = min(remaining, int(ties[r, i]))
            if r == me:
                tied = (s == threshold).flatten().nonzero().squeeze(1)
                keep.view(-1)[tied[take:]] = True  # ties beyond the budget are kept
            remaining -= take
        masks.append(keep)
    return masks


class Pruner:
    def __init__(self, config: PruneConfig, total_steps: int):
        self.config = config
        self.total_steps = total_steps
        self.criterion = get_criterion(config.saliency)
        self.schedule = get_schedule(config.schedule)
        self.pattern = parse_pattern(config.pattern)
        # The first step at or after `final`: the mask snaps to the target there, then stays.
        self.final_step = max(1, min(total_steps, math.ceil(config.final * total_steps)))
        self.modules: dict[str, nn.Module] = {}
        self.input_dims: dict[str, int] = {}
        self.scores: dict[str, torch.Tensor] = {}
        self.input_norms: dict[str, torch.Tensor] = {}  # global-wanda: ||x|| per input feature
        self.workspace = ScratchBuffers()  # w * mask in forward and backward, the Taylor scores
        self.sparsity = 0.0  # the scheduled fraction the masks currently hold
        self.history: list[dict] = []
        self.groups: list = []  # structured pruning: the units of every layer (structure.py)

    @property
    def sharded(self) -> bool:
        """Whether the weights are FSDP2 shards (DTensors): then every sum runs over the processes."""
        return any(dist.is_sharded(w) for w in self.weights.values())

    # -- setup -------------------------------------------------------------------------
    def check(self, model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, int]]:
        """The prunable modules and their input axes, once it is known the pattern fits them."""
        modules = prunable_weights(model)
        if not modules:
            raise ValueError("the model has no prunable projection weights (nn.Linear or Conv1D)")
        dims = {name: input_dim(module) for name, module in modules.items()}
        check_divisible(self.pattern, {n: tuple(m.weight.shape) for n, m in modules.items()}, dims)
        return modules, dims

    def prepare(self, model: nn.Module) -> Pruner:
        self.modules, self.input_dims = self.check(model)
        if self.config.structure:
            self.groups = find_groups(model, tuple(self.config.structure), self.modules)
        for name, module in self.modules.items():
            mask = torch.ones_like(module.weight, dtype=torch.bool)
            parametrize.register_parametrization(module, "weight", Mask(mask))
            # The module computes with `w * mask` without keeping it for backward; `module.weight`
            # still gives `w * mask` to anyone who asks.
            transposed = self.input_dims[name] == 0  # stored (in, out), as GPT-2's Conv1D
            module.forward = functools.partial(_masked_forward, module, self.workspace, transposed)
        return self

    @torch.no_grad()
    def calibrate(self, model: nn.Module, windows: torch.Tensor, batch_size: int = 4, device="cpu") -> None:
        """Record the L2 norm of each prunable layer's input features over `windows` (for global-wanda).

        The norm is shaped to broadcast over the stored weight: (1, in) for nn.Linear,
        whose weight is (out, in), and (in, 1) for GPT-2's Conv1D, whose weight is (in, out).
        """
        sums: dict[str, torch.Tensor] = {}

        def hook(name):
            def record(module, inputs):
                x = inputs[0].detach().float()
                sq = x.pow(2).reshape(-1, x.shape[-1]).sum(0)
                sums[name] = sums[name] + sq if name in sums else sq
            return record

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in self.modules.items()]
        was_training = model.training
        model.eval()
        try:
            for i in range(0, len(windows), batch_size):
                model(input_ids=windows[i : i + batch_size].to(device))
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        for name in self.modules:
            # Along the weight's input axis: (1, in) for a (out, in) weight, (in, 1) for (in, out).
            self.input_norms[name] = sums[name].sqrt().unsqueeze(1 - self.input_dims[name])

    def _score(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The score of this process's part of `weight` (a parameter, maybe sharded)."""
        if self.config.saliency in NEEDS_ACTIVATIONS and name not in self.input_norms:
            raise ValueError(f"{self.config.saliency} saliency needs calibration activations; "
                             "call Pruner.calibrate(model, windows) before the first mask update")
        values, norm = dist.local(weight), self.input_norms.get(name)
        if norm is not None and norm.shape[0] > 1 and norm.shape[0] != values.shape[0]:
            norm = norm[slice(*dist.shard_rows(norm.shape[0]))]  # (in, 1) against a Conv1D's shard of rows
        grad = None if weight.grad is None else dist.local(weight.grad)
        return self.criterion(values, grad, norm)

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The stored (unmasked) weights, as parameters (sharded: DTensors): what the optimizer updates."""
        return {n: m.parametrizations.weight.original for n, m in self.modules.items()}

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The keep-masks (sharded: this process's rows; writing them writes the shard)."""
        return {n: dist.local(m.parametrizations.weight[0].mask) for n, m in self.modules.items()}

    def param_masks(self) -> dict[torch.Tensor, torch.Tensor]:
        """{parameter: mask} for the optimizer, which must leave masked weights alone."""
        masks = self.masks
        return {w: masks[n] for n, w in self.weights.items()}

    def num_prunable(self) -> int:
        return _total([sum(m.numel() for m in self.masks.values())], self.sharded)[0]

    def num_masked(self) -> int:
        return _total([sum(int((~m).sum()) for m in self.masks.values())], self.sharded)[0]

    @property
    def current_sparsity(self) -> float:
        """Masked fraction of the prunable weights since the last mask update."""
        return self.history[-1]["sparsity"] if self.history else 0.0

    # -- every step ----------------------------------------------------------------------
    def scoring(self, step: int, every_step: bool = False) -> bool:
        """Whether step `step`'s gradients feed the scores: a gradient saliency, the mask not yet fixed,
        and one of the last `prune.score_steps` steps before a mask update (unless `every_step`)."""
        cfg = self.config
        if cfg.saliency not in NEEDS_GRADIENT or step > self.final_step or self.fixed:
            return False
        if every_step or not cfg.score_steps:
            return True
        next_update = min(-(-step // cfg.prune_every) * cfg.prune_every, self.final_step)
        return next_update - step < cfg.score_steps

    @torch.no_grad()
    def observe(self, step: int, every_step: bool = False) -> None:
        """Fold this step's gradients into the running average of Taylor scores.

        Call after backward and before `mask_gradients_`: masked weights need their
        straight-through gradient to be scored. Nothing to do once the mask is fixed, nor
        (`prune.score_steps`) on a step too far from the next mask update, unless `every_step`.
        """
        if not self.scoring(step, every_step):
            return
        beta = self.config.score_momentum
        for name, weight in self.weights.items():
            if weight.grad is None:
                continue
            if name not in self.scores:
                self.scores[name] = self._score(name, weight)
                continue
            # The score in the reused buffer, then into the running average: no fresh
            # memory per layer (fresh scores cost 180 ms a step on SmolLM2, this 70 ms).
            values = dist.local(weight)
            score = self.criterion(values, dist.local(weight.grad), out=self.workspace.like(values))
            self.scores[name].lerp_(score, 1 - beta)

    @torch.no_grad()
    def mask_gradients_(self) -> None:
        """Zero the gradients of masked weights so clipping and the optimizer ignore them."""
        masks = self.masks  # each property access walks all the parametrizations: once per call
        for name, weight in self.weights.items():
            if weight.grad is not None:
                grad = dist.local(weight.grad)
                grad.mul_(self.workspace.mask_as(masks[name], grad))

    @property
    def fixed(self) -> bool:
        """One-shot methods choose the mask before training; it never changes after."""
        return self.config.method != "dynamic"

    def should_update(self, step: int) -> bool:
        if step > self.final_step or self.fixed:
            return False
        return step == self.final_step or step % self.config.prune_every == 0

    @torch.no_grad()
    def step(self, step: int, recent_losses=()) -> dict | None:
        """After optimizer step `step` (1-based): update the masks if the schedule says so."""
        if not self.should_update(step):
            return None
        cfg = self.config
        if step >= self.final_step:
            alpha, target = 1.0, cfg.sparsity
        else:
            alpha = stability(list(recent_losses)[-cfg.loss_window:], cfg.stability)
            scheduled = self.schedule(step / self.total_steps, cfg.sparsity, cfg.warmup, cfg.tau, cfg.final)
            # alpha slows pruning down; it never gives back sparsity already reached.
            target = max(self.sparsity, min(cfg.sparsity, scheduled * alpha))
        if target == 0.0:
            return None
        names, sharded = list(self.modules), self.sharded
        old, weights = self.masks, self.weights
        if self.groups:
            return self._record(step, target, alpha, old, self._unit_masks(target, old, weights), sharded)
        scores = []
        for name in names:
            score = self.scores.get(name)
            if score is None:
                score = self._score(name, weights[name])
            score = score.float()
            if not cfg.regrowth:
                score = score.masked_fill(~old[name], -math.inf)
            scores.append(score)
        total = _total([sum(s.numel() for s in scores)], sharded)[0]
        k = round(target * total)
        keys = selection_keys(scores, [self.input_dims[n] for n in names], k, self.pattern,
                              count=lambda n: _total([n], sharded)[0])
        new = global_masks(keys, k, seed=step, sharded=sharded)
        return self._record(step, target, alpha, old, dict(zip(names, new)), sharded)

    def _unit_masks(self, target: float, old: dict[str, torch.Tensor], weights) -> dict[str, torch.Tensor]:
        """Structured: whole units masked, equal widths in every layer, within `target` (structure.py)."""
        if self.sharded:
            raise ValueError("structured pruning does not run sharded; use train.parallel: ddp")
        scores = {name: (self.scores[name] if name in self.scores else self._score(name, weights[name])).float()
                  for name in self.modules}
        units = [unit_scores(group, scores, self.modules) for group in self.groups]
        # Kinds trade by what removing a unit costs: the scores of its output weights (heads' q_proj rows score
        # half of what their o_proj columns do per weight, and made heads look cheaper than their removal is)
        prices = [unit_scores(group, scores, self.modules, output=True) for group in self.groups]
        start = None if self.config.regrowth else removed_units(self.groups, old, self.modules)
        removed = plan_removal(self.groups, units, self.modules, round(target * self.num_prunable()), start, prices)
        return unit_masks(self.groups, units, self.modules, removed, None if self.config.regrowth else old)

    def _record(self, step: int, target: float, alpha: float, old: dict[str, torch.Tensor],
                new: dict[str, torch.Tensor], sharded: bool) -> dict:
        """Write the `new` masks over the `old` ones and log the update."""
        changed = [0, 0, 0, 0]
        for name, keep in new.items():
            changed[0] += int((old[name] & ~keep).sum())
            changed[1] += int((~old[name] & keep).sum())
            changed[2] += int((~keep).sum())
            changed[3] += keep.numel()
            old[name].copy_(keep)
        pruned, regrown, masked, total = _total(changed, sharded)
        record = {"step": step, "target": target, "alpha": alpha, "masked": masked, "pruned": pruned,
                  "regrown": regrown, "sparsity": masked / total}
        if self.groups:
            record["units"] = removed_units(self.groups, old, self.modules)
        self.sparsity = target
        self.history.append(record)
        return record

    @torch.no_grad()
    def start_from(self, masks: dict[str, torch.Tensor], method: str, seconds: float = 0.0) -> dict:
        """Take a one-shot method's masks (at the target) as the masks at step 0."""
        current = self.masks
        if set(masks) != set(current):
            raise ValueError("the one-shot masks belong to a model with other prunable layers")
        for name, keep in masks.items():
            current[name].copy_(keep)
        masked = self.num_masked()
        self.sparsity = self.config.sparsity
        record = {"step": 0, "target": self.sparsity, "alpha": 1.0, "masked": masked, "pruned": masked,
                  "regrown": 0, "sparsity": masked / self.num_prunable(), "method": method, "seconds": seconds}
        self.history.append(record)
        return record

    # -- end -----------------------------------------------------------------------------
    @torch.no_grad()
    def finalize(self) -> None:
        """Write w * mask into the weights and remove the parametrizations."""
        for module in self.modules.values():
            module.__dict__.pop("forward", None)
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            # w * 0 is -0.0 for negative w; adding +0.0 makes every masked weight +0.0
            # (IEEE: -0.0 + 0.0 = +0.0, any other value unchanged), so zeros are plain zeros.
            module.weight.data.add_(0.0)
        self.scores.clear()

    def state_dict(self) -> dict:
        return {
            "masks": {n: m.clone() for n, m in self.masks.items()},
            "scores": {n: s.clone() for n, s in self.scores.items()},
            "sparsity": self.sparsity,
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        masks = self.masks
        if set(state["masks"]) != set(masks):
            raise ValueError("pruner state belongs to a model with other prunable layers")
        for name, mask in state["masks"].items():
            masks[name].copy_(mask)
        self.scores = {n: s.to(masks[n].device, copy=True) for n, s in state["scores"].items()}  # saved on the CPU
        self.sparsity = state["sparsity"]
        self.history = list(state["history"])


def build_pruner(model: nn.Module, config: PruneConfig, total_steps: int, calibration: torch.Tensor,
                 batch_size: int = 4, oneshot: bool = True, progress=None) -> Pruner:
    """The pruner a run starts with, its masks set by a one-shot method first when the recipe says so.

    `calibration`: the windows one-shot methods and global-wanda calibrate on. `oneshot`
    False skips the one-shot method (a resumed run takes its masks from the checkpoint).
    """
    pruner = Pruner(config, total_steps)
    method = config.method if config.method != "dynamic" else config.start
    masks, started = None, time.perf_counter()
    if oneshot and method in METHODS:
        modules, _ = pruner.check(model)
        masks = prune_oneshot(model, modules, calibration, method, config.sparsity, pruner.pattern,
                              batch_size=batch_size, block_size=config.sparsegpt_block, damp=config.sparsegpt_damp,
                              progress=progress)
    pruner.prepare(model)
    if masks is not None:
        pruner.start_from(masks, method, time.perf_counter() - started)
    if config.saliency in NEEDS_ACTIVATIONS:
        pruner.calibrate(model, calibration, batch_size, next(model.parameters()).device)
    return pruner
