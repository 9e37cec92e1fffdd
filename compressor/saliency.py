"""Saliency criteria: how much each weight matters (higher = keep).

`taylor` is the first-order Taylor estimate of the loss change if the weight were set
to zero, |w * dE/dw| (thesis eq. 4.1/4.4); `magnitude` is the |w| baseline. Both take
the kept value of a masked weight, so masked weights can compete to come back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def taylor(weight: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    if grad is None:
        raise ValueError("taylor saliency needs a gradient; run a backward pass first")
    return (weight * grad).abs_()


def magnitude(weight: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    return weight.abs()


CRITERIA: dict[str, Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "taylor": taylor,
    "magnitude": magnitude,
}
NEEDS_GRADIENT = {"taylor"}


def get_criterion(name: str):
    try:
        return CRITERIA[name]
    except KeyError:
        raise ValueError(f"unknown saliency {name!r}; choose one of {', '.join(CRITERIA)}") from None
