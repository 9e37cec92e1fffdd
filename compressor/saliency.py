"""Saliency criteria: how much each weight matters (higher = keep).

`taylor` is the first-order Taylor estimate of the loss change if the weight were set
to zero, |w * dE/dw| (thesis eq. 4.1/4.4); `magnitude` is the |w| baseline; `global-wanda`
is Wanda's score (Sun et al. 2023), |w| times the L2 norm of the weight's input feature
over calibration tokens, ranked over the whole model by the global threshold -- not the
paper's method, which compares weights within each output row, layer by layer
(`oneshot.py`). All take the kept value of a masked weight, so masked weights can
compete to come back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def taylor(weight: torch.Tensor, grad: torch.Tensor | None, input_norm: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """`out`: a buffer for the result (the pruner reuses one every step instead of a fresh tensor)."""
    if grad is None:
        raise ValueError("taylor saliency needs a gradient; run a backward pass first")
    return torch.mul(weight, grad, out=out).abs_()


def magnitude(weight: torch.Tensor, grad: torch.Tensor | None, input_norm: torch.Tensor | None = None) -> torch.Tensor:
    return weight.abs()


def global_wanda(weight: torch.Tensor, grad: torch.Tensor | None, input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """|w| * ||x||: `input_norm` is already shaped to broadcast over the weight's input axis."""
    if input_norm is None:
        raise ValueError("global-wanda saliency needs calibration activations; call Pruner.calibrate(model, windows) first")
    return weight.abs() * input_norm


CRITERIA: dict[str, Callable[..., torch.Tensor]] = {
    "taylor": taylor,
    "magnitude": magnitude,
    "global-wanda": global_wanda,
}
NEEDS_GRADIENT = {"taylor"}  # these also take `out=`, a buffer for the score
NEEDS_ACTIVATIONS = {"global-wanda"}


def get_criterion(name: str):
    try:
        return CRITERIA[name]
    except KeyError:
        raise ValueError(f"unknown saliency {name!r}; choose one of {', '.join(CRITERIA)}") from None
