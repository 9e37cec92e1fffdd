"""Sparsity patterns: `unstructured`, or N:M (at most N non-zero in every M consecutive input weights).

N:M is the pattern sparse tensor cores accelerate (2:4 on NVIDIA Ampere and later).
"Consecutive input weights" run along the input dimension, which is dim 1 of an
`nn.Linear` weight (out, in) but dim 0 of GPT-2's `Conv1D` weight (in, out).

The pruner keeps its global threshold under a pattern by ranking in two stages: in
every group, the M-N lowest-scored weights become candidates, and the global
selection of the k weights to mask runs over the candidates only. Once every
candidate is masked (sparsity above (M-N)/M), the remaining k - candidates are
selected globally among the survivors, which keeps the pattern (groups only lose
more weights). Masked weights keep their scores, so regrowth works unchanged: a
masked weight that outranks a kept one in its group stops being a candidate.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UsageError

_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class Pattern:
    n: int | None = None  # None: unstructured
    m: int | None = None

    @property
    def structured(self) -> bool:
        return self.n is not None

    @property
    def min_sparsity(self) -> float:
        """The fraction of weights the pattern masks at the least."""
        return (self.m - self.n) / self.m if self.structured else 0.0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"


def parse_pattern(text: str) -> Pattern:
    if text == "unstructured":
        return Pattern()
    match = _NM.match(text.strip())
    if not match:
        raise ValueError(f"unknown pattern {text!r}; use 'unstructured' or N:M such as 2:4")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise ValueError(f"pattern {text!r} needs 0 < N < M (keep N of every M weights), e.g. 2:4")
    return Pattern(n, m)


def input_dim(module: nn.Module) -> int:
    """The weight dimension that runs over the layer's inputs."""
    from transformers.pytorch_utils import Conv1D

    return 0 if isinstance(module, Conv1D) else 1


def as_rows(weight: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """`weight` as [out, in] (a view): GPT-2's Conv1D stores it (in, out). Its own inverse."""
    return weight.T if input_dim(module) == 0 else weight


def _grouped(tensor: torch.Tensor, dim: int, m: int) -> torch.Tensor:
    """View `tensor` as (..., groups, m) with each group m consecutive entries along `dim`."""
    moved = tensor.movedim(dim, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)


def _ungrouped(grouped: torch.Tensor, dim: int) -> torch.Tensor:
    flat = grouped.reshape(*grouped.shape[:-2], -1)
    return flat.movedim(-1, dim)


def check_divisible(pattern: Pattern, shapes: dict[str, tuple[int, ...]], dims: dict[str, int]) -> None:
    if not pattern.structured:
        return
    for name, shape in shapes.items():
        if shape[dims[name]] % pattern.m:
            raise UsageError(
                f"pattern {pattern} needs input widths divisible by {pattern.m}, but {name} has "
                f"{shape[dims[name]]} inputs; use --pattern unstructured for this model"
            )


def candidate_mask(score: torch.Tensor, dim: int, pattern: Pattern) -> torch.Tensor:
    """True for the M-N lowest-scored weights of every group (ties broken by position)."""
    grouped = _grouped(score, dim, pattern.m)
    # A stable sort puts equal scores in position order, so the choice is reproducible.
    order = grouped.argsort(dim=-1, stable=True)
    lowest = torch.zeros_like(grouped, dtype=torch.bool)
    lowest.scatter_(-1, order[..., : pattern.m - pattern.n], True)
    return _ungrouped(lowest, dim)


def selection_keys(
    scores: list[torch.Tensor], dims: list[int], k: int, pattern: Pattern, count=lambda n: n
) -> list[torch.Tensor]:
    """Scores rewritten so that masking the k lowest keys over all tensors keeps the pattern.

    While k fits among the candidates, non-candidates get +inf (never masked); beyond
    that, candidates get -inf (all masked) and the rest compete by their own score.
    `count`: the total over all processes of a count over this process's shards.
    """
    if not pattern.structured:
        return scores
    candidates = [candidate_mask(s, d, pattern) for s, d in zip(scores, dims)]
    n_candidates = count(sum(int(c.sum()) for c in candidates))
    if k <= n_candidates:
        return [s.masked_fill(~c, math.inf) for s, c in zip(scores, candidates)]
    return [s.masked_fill(c, -math.inf) for s, c in zip(scores, candidates)]


def violations(weight: torch.Tensor, dim: int, pattern: Pattern) -> tuple[int, int]:
    """(groups with more than N non-zeros, groups) of `weight` under `pattern`."""
    if not pattern.structured:
        return 0, 0
    if weight.shape[dim] % pattern.m:
        groups = math.ceil(weight.shape[dim] / pattern.m) * weight.numel() // weight.shape[dim]
        return groups, groups  # a width the pattern cannot tile: no group is valid
    nonzero = _grouped(weight != 0, dim, pattern.m).sum(-1)
    return int((nonzero > pattern.n).sum()), nonzero.numel()
