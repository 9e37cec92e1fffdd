"""Reused weight-sized buffers, so a step's temporaries cost no fresh memory.

A fresh 100-million-element temporary on every step is slow on CPU for a reason that
has nothing to do with arithmetic: large allocations come from the operating system
page by page (half the CPU time went to the kernel when SmolLM2-135M trained without them).
The same holds for the hidden temporary of a mixed-dtype product: `w * mask` with a
boolean mask first casts the mask to a fresh float tensor. Here the cast goes into a
reused buffer instead.
"""

from __future__ import annotations

import torch


class ScratchBuffers:
    """One flat buffer per (device, dtype, slot), grown to the largest tensor asked for."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def like(self, tensor: torch.Tensor, slot: int = 0) -> torch.Tensor:
        """An uninitialised buffer of `tensor`'s shape, dtype and device (valid until the slot's next use)."""
        key = (tensor.device, tensor.dtype, slot)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < tensor.numel():
            with torch.inference_mode(False):  # a buffer born in inference mode could not be reused
                buf = self.buffers[key] = torch.empty(tensor.numel(), device=tensor.device, dtype=tensor.dtype)
        return buf[: tensor.numel()].view(tensor.shape)

    def mask_as(self, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The boolean `mask` as 0/1 in `like`'s dtype, in slot 1. Cast from its uint8 view:
        bool -> float has a slow path on CPU, uint8 -> float does not (same values)."""
        return self.like(like, slot=1).copy_(mask.view(torch.uint8))

    def masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`x * mask` in slot 0."""
        return torch.mul(x, self.mask_as(mask, x), out=self.like(x))
