"""AdamW with a terminal-attractor (TA) term (thesis eq. 4.10-4.15).

    w <- w + dw_AdamW - eta_TA * tanh(k E) * Psi
    Psi = gamma * E^beta / (<g, d> + eps) * d,   clipped to norm <= C

`d` is the direction the term pushes along: the gradient `g` (thesis; then <g, d> is
||g||^2) or Adam's preconditioned step m_hat / (sqrt(v_hat) + eps) (`space="adam"`).
Dividing by <g, d> is what makes it an attractor: along -d the loss falls at the rate
gamma * E^beta whatever the size of the gradient, so it reaches its target in finite
time instead of slowing down with the gradient. E is the batch loss, or its excess
over a reference loss (`target="reference"`), since a language model's loss never
reaches 0. Norms and dot products run over all parameters together.

Gradients are usually clipped (to norm 1) before the optimizer sees them. By default the
term is computed from the clipped gradient g_c: then ||Psi|| = gamma * E^beta / ||g_c|| is
at least E^beta, so once the loss exceeds C^(1/beta) the saturation always binds and the
term is a normalized gradient step of length eta_TA * tanh(kE) * C. With
`before_clip=True` it is computed from the gradient before clipping, as the thesis has
it: Psi = gamma * E^beta / ||g||^2 * g, ||Psi|| = gamma * E^beta / ||g||, so the step
shrinks where the gradient is large and C binds only where ||g|| < gamma * E^beta / C.
(Same direction: g is g_c scaled up, so the step is applied along g_c.)

With `ta_lr=0` the step is exactly `torch.optim.AdamW` (single-tensor path). Masked
weights (`masks`) are left alone: neither Adam, weight decay nor TA moves them; their
gradients are zeroed in place (unless the caller did, `grads_masked=True`) and their
momentum when the mask changes, so one that grows back starts afresh.
The TA step size follows the learning-rate schedule: eta_TA(t) = ta_lr * lr(t) / lr(0).

Sharded parameters (FSDP2 DTensors): every elementwise update runs on the process's
shard, the moments are shards too, and the TA term's dot products are summed over the
processes, so the step is the one a single process would take.
"""

from __future__ import annotations

import math

import torch

from . import distributed as dist
from .buffers import ScratchBuffers


class TAAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 5e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        ta_lr: float = 0.0,
        gamma: float = 1.0,
        beta: float = 0.5,
        ta_eps: float = 1e-8,
        clip: float = 1.0,
        k: float = 1.0,
        space: str = "gradient",
        before_clip: bool = False,
        ref_loss: float | None = None,
        masks: dict[torch.Tensor, torch.Tensor] | None = None,
        grads_masked: bool = False,
    ):
        if space not in ("gradient", "adam"):
            raise ValueError(f"unknown TA space {space!r}; choose gradient or adam")
        if before_clip and space != "gradient":
            raise ValueError("the TA term before clipping is defined in the gradient space (space='gradient')")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.ta = {"lr": ta_lr, "gamma": gamma, "beta": beta, "eps": ta_eps, "clip": clip, "k": k,
                   "space": space, "ref_loss": ref_loss, "before_clip": before_clip}
        self.masks = masks or {}
        self.grads_masked = grads_masked  # the caller zeroes masked gradients before step()
        self._mask_versions: dict[torch.Tensor, int] = {}  # each mask's version when momentum was last masked
        self._scratch = ScratchBuffers()  # the masks cast to float, one at a time
        self.last_ta: dict = {}  # what the TA term did at the last step, for the log
        self.sharded = any(dist.is_sharded(p) for group in self.param_groups for p in group["params"])

    def _adam_direction(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """m_hat / (sqrt(v_hat) + eps): Adam's step divided by -lr."""
        state, (beta1, beta2) = self.state[p], group["betas"]
        step = state["step"].item()
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
        return state["exp_avg"] / (1 - beta1**step) / denom

    def _mask_changed(self, p: torch.Tensor, mask: torch.Tensor) -> bool:
        """Whether `mask` was written since the last step (its in-place version counter moved)."""
        changed = self._mask_versions.get(p) != mask._version
        self._mask_versions[p] = mask._version
        return changed

    @torch.no_grad()
    def step(self, closure=None, *, loss: float | None = None,
             grad_norm: float | torch.Tensor | None = None, unclipped_norm: float | torch.Tensor | None = None):
        """`grad_norm`: the global norm of the (masked, clipped) gradients when the caller
        knows it, as after clipping; it saves the TA term a pass over the gradients.
        `unclipped_norm`: their norm before clipping (the TA term uses it with `before_clip`;
        without it the gradients are taken as unclipped)."""
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ta_on = self.ta["lr"] > 0
        norm_known = grad_norm is not None and self.ta["space"] == "gradient"  # then <g, g> = grad_norm^2
        if ta_on and loss is None:
            raise ValueError("the TA term needs the loss: call step(loss=...) or pass a closure")
        dots, sq_norms = [], []  # per-parameter <g, d> and ||d||^2, summed once at the end
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                p, grad, keep = dist.local(param), dist.local(param.grad), self.masks.get(param)
                mask = None if keep is None else self._scratch.mask_as(keep, p)  # 0/1 in p's dtype
                if mask is not None:
                    if not self.grads_masked:
                        grad.mul_(mask)  # masked weights take no part: in the moments, the norms, the TA term
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                if keep is not None and self._mask_changed(param, keep):
                    # A newly masked weight may carry momentum from before: zero it, so Adam's
                    # step leaves the weight exactly where it is, and a weight that grows back
                    # starts with a fresh momentum. Its gradient is zero from now on, so the
                    # momentum stays zero until the mask changes again.
                    exp_avg.mul_(mask)
                state["step"] += 1
                step = state["step"].item()
                if wd != 0:
                    if mask is None:
                        p.mul_(1 - lr * wd)
                    else:
                        p.addcmul_(p, mask, value=-lr * wd)  # a masked weight keeps its value
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = lr / (1 - beta1**step)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-step_size)
                if ta_on:
                    g = grad.reshape(-1)
                    if self.ta["space"] == "gradient":
                        if not norm_known:
                            dots.append(torch.dot(g, g))
                    else:
                        d = self._adam_direction(param, group)
                        if mask is not None:
                            d.mul_(mask)
                        d = d.reshape(-1)
                        dots.append(torch.dot(g, d))
                        sq_norms.append(torch.dot(d, d))
        if ta_on:
            if norm_known:
                dot = float(grad_norm) ** 2
            else:
                dot = torch.stack(dots).double().sum().item() if dots else 0.0
            sq_norm = torch.stack(sq_norms).double().sum().item() if sq_norms else 0.0
            if self.sharded and not norm_known:  # each process summed over its shards
                dot, sq_norm = dist.sum_shards([dot, sq_norm])
            if sq_norms:
                self._ta_step(float(loss), dot, sq_norm)
            elif self.ta["before_clip"] and unclipped_norm is not None:
                # Psi along g = g_c * ||g|| / ||g_c||: <g, g> = ||g||^2, applied to g_c.
                self._ta_step(float(loss), float(unclipped_norm) * math.sqrt(dot), dot)
            else:
                self._ta_step(float(loss), dot, dot)
        return loss

    @torch.no_grad()
    def _ta_step(self, loss: float, dot: float, sq_norm: float) -> None:
        ta = self.ta
        energy = loss - ta["ref_loss"] if ta["ref_loss"] is not None else loss
        if energy <= 0 or dot <= 0:
            # At (or below) the attractor, or a direction that would not lower the loss.
            self.last_ta = {"coef": 0.0, "norm": 0.0, "energy": energy}
            return
        scale = ta["gamma"] * energy ** ta["beta"] / (dot + ta["eps"])
        norm = scale * math.sqrt(sq_norm)  # ||Psi||
        saturation = min(1.0, ta["clip"] / norm) if norm > 0 else 1.0
        group0 = self.param_groups[0]
        schedule = group0["lr"] / group0.get("initial_lr", group0["lr"])
        coef = ta["lr"] * schedule * math.tanh(ta["k"] * energy) * scale * saturation
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                p = dist.local(param)
                if ta["space"] == "gradient":
                    p.add_(dist.local(param.grad), alpha=-coef)  # masked by now (in step() or by the caller)
                    continue
                d = self._adam_direction(param, group)
                mask = self.masks.get(param)
                if mask is not None:
                    d.mul_(self._scratch.mask_as(mask, d))
                p.add_(d, alpha=-coef)
        self.last_ta = {"coef": coef, "norm": coef * math.sqrt(sq_norm), "energy": energy,
                        "saturated": saturation < 1.0}

    def state_dict(self):
        state = super().state_dict()
        state["ta"] = dict(self.ta)
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.ta.update(state_dict.pop("ta", {}))
        super().load_state_dict(state_dict)
