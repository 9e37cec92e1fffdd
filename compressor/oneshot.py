"""One-shot pruning from calibration text, no training: SparseGPT and Wanda as their papers do them.

Both run layer by layer in model order (`calibration.layer_by_layer`): each decoder
layer is pruned with the inputs it gets from the layers before it *already pruned*.

- **Wanda** (Sun et al. 2023) scores a weight by |w| * ||x_j||, the norm of its input
  feature over the calibration tokens, and compares weights *within each output row*
  (each row loses the same number of weights). Weights are not changed.
- **SparseGPT** (Frantar & Alistarh 2023) goes through the input columns in blocks of
  `block_size`; in each block it masks the weights with the lowest w^2 / [H^-1]_jj^2 (the
  loss of removing them under the layer's Hessian `H = X^T X / n`, dampened by `damp`
  times its mean diagonal), and moves each removed weight's error onto the columns not
  yet visited, as GPTQ does for rounding. Kept weights change.

Under an N:M pattern both choose M-N of every M consecutive inputs of a row (SparseGPT
chooses a group when it reaches it, from the weights as updated so far). Unstructured,
each layer is pruned to exactly round(sparsity * size) weights: Wanda gives the rows
whose next weight scores lowest one weight more when the count does not divide evenly;
SparseGPT spreads the count over its blocks.

The weights a method masks keep their dense values under the mask (the model computes
with `w * mask`), so the dynamic job can start from a one-shot mask and still regrow.
"""

from __future__ import annotations

import torch
from torch import nn

from .calibration import layer_by_layer
from .patterns import Pattern, as_rows, candidate_mask

METHODS = ("sparsegpt", "wanda")


def wanda_mask(weight: torch.Tensor, norm: torch.Tensor, sparsity: float, pattern: Pattern = Pattern()) -> torch.Tensor:
    """Keep-mask for `weight` [out, in] with input feature norms `norm` [in], compared per row."""
    score = weight.abs() * norm[None, :]
    if pattern.structured:
        return ~candidate_mask(score, 1, pattern)
    out, inp = score.shape
    per_row, extra = divmod(round(sparsity * out * inp), out)
    order = score.argsort(dim=1, stable=True)
    keep = torch.ones_like(score, dtype=torch.bool)
    keep.scatter_(1, order[:, :per_row], False)
    if extra:
        following = order[:, per_row]
        rows = score.gather(1, following[:, None]).squeeze(1).argsort(stable=True)[:extra]
        keep[rows, following[rows]] = False
    return keep


@torch.no_grad()
def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: Pattern = Pattern(),
              block_size: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned and updated weight, keep-mask) for `weight` [out, in] and its Hessian [in, in]."""
    w = weight.detach().float().clone()
    out, inp = w.shape
    h = hessian.detach().double().cpu().clone()
    dead = torch.diag(h) == 0  # inputs that are always 0: their weights do nothing
    h[dead, dead] = 1.0
    w[:, dead.to(w.device)] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(inp, dtype=h.dtype)
    # Upper Cholesky factor of H^-1: row j holds how removing column j's weights moves the columns after it.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float().to(w.device)
    if pattern.structured:
        block_size = max(pattern.m, block_size - block_size % pattern.m)
    keep = torch.ones_like(w, dtype=torch.bool)
    for start in range(0, inp, block_size):
        end = min(start + block_size, inp)
        part, inv = w[:, start:end].clone(), hinv[start:end, start:end]
        loss = part.pow(2) / torch.diag(inv).pow(2)[None, :]
        kept = torch.ones(part.shape, dtype=torch.bool, device=part.device)
        if not pattern.structured:  # this block's share of the layer's exact count
            count = round(sparsity * out * end) - round(sparsity * out * start)
            kept.view(-1)[loss.flatten().topk(count, largest=False).indices] = False
        errors = torch.zeros_like(part)
        for i in range(end - start):
            if pattern.structured and i % pattern.m == 0:
                group = part[:, i : i + pattern.m].pow(2) / torch.diag(inv)[i : i + pattern.m].pow(2)[None, :]
                drop = group.topk(pattern.m - pattern.n, dim=1, largest=False).indices
                kept[:, i : i + pattern.m].scatter_(1, drop, False)
            removed = part[:, i] * ~kept[:, i]
            errors[:, i] = removed / inv[i, i]
            part[:, i:] -= errors[:, i, None] * inv[i, i:][None, :]
            part[:, i] *= kept[:, i]  # exactly 0 where masked
        w[:, start:end], keep[:, start:end] = part, kept
        w[:, end:] -= errors @ hinv[start:end, end:]
    return w, keep


@torch.no_grad()
def prune_oneshot(model: nn.Module, modules: dict[str, nn.Module], windows: torch.Tensor, method: str,
                  sparsity: float, pattern: Pattern = Pattern(), *, batch_size: int = 4, block_size: int = 128,
                  damp: float = 0.01, progress=None) -> dict[str, torch.Tensor]:
    """Prune `modules` (plain, not yet parametrized) with `method`; returns keep-masks shaped like each weight.

    The kept weights hold the method's values (SparseGPT's updated ones); the masked ones
    hold their dense values again once the layers after them are calibrated.
    """
    if method not in METHODS:
        raise ValueError(f"unknown one-shot method {method!r}; choose one of {', '.join(METHODS)}")
    masks: dict[str, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}  # the previous layer's masked values, put back after its outputs are used

    def put_back():
        for name, values in dense.items():
            weight = modules[name].weight
            weight.copy_(torch.where(masks[name], weight, values))
        dense.clear()

    for index, total, inside, moments in layer_by_layer(model, modules, windows, batch_size,
                                                         diagonal=method == "wanda"):
        put_back()
        for name, module in inside.items():
            rows = as_rows(module.weight.detach().float(), module)
            if method == "wanda":
                keep, new = wanda_mask(rows, moments[name].sqrt(), sparsity, pattern), rows
            else:
                new, keep = sparsegpt(rows, moments[name], sparsity, pattern, block_size, damp)
            masks[name] = as_rows(keep, module).contiguous()
            dense[name] = module.weight.detach().clone()
            module.weight.copy_(as_rows(new * keep, module).to(module.weight))
        if progress:
            progress({"done": index + 1, "total": total})
    put_back()
    missing = sorted(set(modules) - set(masks))
    if missing:
        raise ValueError(f"{missing[0]} is outside the model's decoder layers, which one-shot pruning goes through")
    return masks
