"""Structured pruning: whole MLP channels and attention heads, masked while training, cut out at the end.

A unit is what a smaller config can drop: an MLP channel (a row of gate and up, or of
GPT-2's `c_fc`, and the matching column of down / `c_proj`) or a query head (its rows of
`q_proj` and columns of `o_proj`). The pruner keeps its machinery: element scores
(Taylor by default) are summed over each unit's weights, the dynamic schedule sets the
target, and every mask update ranks the units again, so a masked unit whose score has
risen comes back (regrowth). Masking all of a unit's weights makes its contribution
exactly zero (act(0) * 0 for a channel; a head's output through zeroed `o_proj`
columns), so the model with masks and the cut model compute the same function.

Widths stay equal across layers, as transformers' configs hold one MLP width and one
head count for all layers: a mask update removes *slices*, 32 more channels in every
layer (where the MLP width divides by 32, so that the cut widths suit int4 blocks and
kernels; else one) or one more query head in every key-value group of every layer, each
the lowest-scored units of their layer (or group). Slices are taken cheapest first (the
sum of their units' prices per weight: the scores of the weights that carry a unit's
output, whose removal alone removes it) while the removed weights stay within the target,
so the target is met from below by less than one slice; the report says what was reached.
With grouped-query attention, heads go in equal numbers from every key-value group, so
`num_attention_heads` stays a multiple of `num_key_value_heads`; key-value heads stay.

`cut(model, masks)` then builds the smaller model from a config with the new widths.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from .calibration import decoder_layers
from .errors import UsageError
from .patterns import as_rows, input_dim

UNITS = ("mlp", "heads")
# MLP widths are cut in multiples of this many channels (when they divide by it): int4 blocks hold 32 inputs,
# and kernels run on widths that are multiples of their vector length.
ALIGN = 32


@dataclass(frozen=True)
class Member:
    """The part of one projection a unit owns: `width` consecutive rows (axis 0) or columns (axis 1)
    of its [out, in] view per unit."""

    module: str
    axis: int
    width: int = 1


@dataclass
class Group:
    """The units of one kind in one layer: `count` of them, in `sets` equal sets (key-value groups)."""

    kind: str
    layer: int
    count: int
    members: list[Member]
    sets: int = 1

    @property
    def per_set(self) -> int:
        return self.count // self.sets

    def weights_per_unit(self, shapes: dict[str, tuple[int, int]]) -> int:
        return sum(m.width * shapes[m.module][1 - m.axis] for m in self.members)


def _config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_groups(model: nn.Module, units: tuple[str, ...], prunable: dict[str, nn.Module]) -> list[Group]:
    """The unit groups of every decoder layer, or a one-line error when the architecture (or its config)
    cannot express the smaller model."""
    config, layers = _config(model), decoder_layers(model)
    names = {id(module): name for name, module in prunable.items()}
    arch = type(model).__name__
    groups = []
    for index, layer in enumerate(layers):
        # the prunable projections of this layer by their name inside it ("mlp.up_proj", "self_attn.q_proj")
        found = {name: names[id(module)] for name, module in layer.named_modules() if id(module) in names}
        if "mlp" in units:
            if {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"} <= found.keys():
                members = [Member(found["mlp.gate_proj"], 0), Member(found["mlp.up_proj"], 0),
                           Member(found["mlp.down_proj"], 1)]
                count = config.intermediate_size
            elif {"mlp.c_fc", "mlp.c_proj"} <= found.keys() and hasattr(config, "n_inner"):
                members = [Member(found["mlp.c_fc"], 0), Member(found["mlp.c_proj"], 1)]
                count = config.n_inner or 4 * config.n_embd
            else:
                raise UsageError(f"--structure mlp does not know the MLP of {arch} (needs gate_proj/up_proj/"
                                 "down_proj or GPT-2's c_fc/c_proj); use unstructured pruning for this model")
            groups.append(Group("mlp", index, count, members))
        if "heads" in units:
            heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
            if not ({"self_attn.q_proj", "self_attn.o_proj"} <= found.keys() and heads and kv
                    and hasattr(config, "head_dim")):
                raise UsageError(f"--structure heads needs a config that sets head_dim and the head counts apart "
                                 f"(Llama, Qwen, Mistral, Gemma); {arch}'s does not; use --structure mlp")
            head_dim = config.head_dim or config.hidden_size // heads
            groups.append(Group("heads", index, heads, [Member(found["self_attn.q_proj"], 0, head_dim),
                                                         Member(found["self_attn.o_proj"], 1, head_dim)], sets=kv))
    return groups


def _by_unit(tensor: torch.Tensor, member: Member, module: nn.Module, count: int) -> torch.Tensor:
    """`tensor` (shaped like the member's weight) as (count, the values of one unit in this member)."""
    view = as_rows(tensor, module)
    if member.axis == 0:
        return view.reshape(count, -1)
    return view.reshape(view.shape[0], count, member.width).transpose(0, 1).reshape(count, -1)


def unit_scores(group: Group, scores: dict[str, torch.Tensor], modules: dict[str, nn.Module],
                output: bool = False) -> torch.Tensor:
    """Each unit's score: the sum of its weights' scores, shaped (sets, per_set). `output`: of the weights
    that carry its output alone (the columns of `down_proj`, `c_proj` or `o_proj`), whose removal removes it."""
    members = [m for m in group.members if m.axis == 1] if output else group.members
    total = sum(_by_unit(scores[m.module], m, modules[m.module], group.count).double().sum(1) for m in members)
    return total.view(group.sets, group.per_set)


def plan_removal(groups: list[Group], units: list[torch.Tensor], modules: dict[str, nn.Module],
                 budget: int, start: dict[str, int] | None = None,
                 prices: list[torch.Tensor] | None = None) -> dict[str, int]:
    """Units to remove per set in every layer, by kind, from each group's unit scores `units` (shaped
    (sets, per_set), as `unit_scores` gives; any importance will do): slices taken cheapest first (the
    sum of their units' `prices`, by default their scores, per weight) while the removed weights stay
    within `budget`, from `start` (the units already removed, when masked units may not come back). A
    slice of a kind holds the lowest-scored units of every layer and set; it is `ALIGN` units of a kind
    whose width divides by it, so the cut widths stay multiples of it; one slice of every kind stays."""
    shapes = {name: tuple(as_rows(module.weight, module).shape) for name, module in modules.items()}
    kinds = {}
    for kind in dict.fromkeys(g.kind for g in groups):
        mine = [(g, u, p) for g, u, p in zip(groups, units, prices or units) if g.kind == kind]
        per_set = mine[0][0].per_set
        step = ALIGN if per_set % ALIGN == 0 and per_set > ALIGN else 1
        # the prices of each layer's (and set's) units from the lowest score up (ties: the lower index first, as
        # unit_masks takes them), summed over layers and sets, a slice at a time
        ordered = torch.stack([p.double().gather(1, u.double().argsort(dim=1, stable=True)) for _, u, p in mine])
        costs = ordered.sum((0, 1)).view(-1, step).sum(1).tolist()
        size = step * sum(g.sets * g.weights_per_unit(shapes) for g, _, _ in mine)  # weights in one slice
        kinds[kind] = (costs, size, step)
    removed = {kind: (start or {}).get(kind, 0) // kinds[kind][2] for kind in kinds}  # in slices
    spent = sum(kinds[kind][1] * n for kind, n in removed.items())
    while True:
        options = [(costs[removed[k]] / size, k) for k, (costs, size, _) in kinds.items()
                   if removed[k] < len(costs) - 1 and spent + size <= budget]
        if not options:
            return {kind: n * kinds[kind][2] for kind, n in removed.items()}
        _, kind = min(options)
        removed[kind] += 1
        spent += kinds[kind][1]


def unit_masks(groups: list[Group], units: list[torch.Tensor], modules: dict[str, nn.Module],
               removed: dict[str, int], old: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Boolean keep-masks of the prunable weights with the `removed[kind]` lowest-scored of each group's
    `units` masked in every set (ties: the lower index goes). `old` without regrowth: masked units stay
    masked."""
    masks = {name: torch.ones_like(module.weight, dtype=torch.bool) for name, module in modules.items()}
    for group, score in zip(groups, units):
        n = removed.get(group.kind, 0)
        if not n:
            continue
        score = score.double()
        if old is not None:
            score = score.masked_fill(~unit_kept(group, old, modules).view_as(score), -math.inf)
        order = score.argsort(dim=1, stable=True)[:, :n]
        drop = torch.zeros_like(score, dtype=torch.bool).scatter_(1, order, True).flatten()
        for m in group.members:
            view = as_rows(masks[m.module], modules[m.module])
            index = drop.repeat_interleave(m.width)
            if m.axis == 0:
                view[index] = False
            else:
                view[:, index] = False
    return masks


def unit_kept(group: Group, masks: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> torch.Tensor:
    """Which of the group's units have any weight unmasked (by its first member)."""
    m = group.members[0]
    return _by_unit(masks[m.module], m, modules[m.module], group.count).any(1)


def removed_units(groups: list[Group], masks: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> dict:
    """Units masked per set, by kind (the most of any layer and set)."""
    out: dict[str, int] = {}
    for group in groups:
        kept = unit_kept(group, masks, modules).view(group.sets, group.per_set).sum(1)
        out[group.kind] = max(out.get(group.kind, 0), group.per_set - int(kept.min()))
    return out


def summary(groups: list[Group], masks: dict[str, torch.Tensor], modules: dict[str, nn.Module], before: nn.Module,
            after: nn.Module) -> dict:
    """What the cut removed, for the report: widths per kind and parameters before and after."""
    removed = removed_units(groups, masks, modules)  # the same in every layer and set: `cut` checks it
    first = {kind: next(g for g in groups if g.kind == kind) for kind in removed}
    return {"units": list(first), "widths": {kind: {"before": g.count, "after": g.count - removed[kind] * g.sets}
                                            for kind, g in first.items()},
            "parameters": {"before": sum(p.numel() for p in set(before.parameters())),
                           "after": sum(p.numel() for p in set(after.parameters()))}}


@torch.no_grad()
def cut(model: nn.Module, groups: list[Group], masks: dict[str, torch.Tensor], modules: dict[str, nn.Module]):
    """The smaller model: a config with the kept widths and the kept rows and columns of every projection
    (and of their biases). Every layer must keep the same number of units of a kind."""
    keep = {}
    for group in groups:
        keep[(group.kind, group.layer)] = unit_kept(group, masks, modules)
    counts = {kind: {int(k.sum()) for (g_kind, _), k in keep.items() if g_kind == kind} for kind, _ in keep}
    if any(len(c) != 1 for c in counts.values()):
        raise ValueError(f"layers keep different numbers of units ({counts}); a config holds one width per kind")
    config = copy.deepcopy(model.config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if "mlp" in counts:
        (width,) = counts["mlp"]
        if hasattr(text, "n_inner"):
            text.n_inner = width
        else:
            text.intermediate_size = width
    if "heads" in counts:
        (heads,) = counts["heads"]
        text.head_dim = text.head_dim or text.hidden_size // text.num_attention_heads
        text.num_attention_heads = heads
    state = dict(model.state_dict())
    for group in groups:
        kept = keep[(group.kind, group.layer)]
        for m in group.members:
            module = modules[m.module]
            index = kept.repeat_interleave(m.width).nonzero().squeeze(1)
            dim = 1 - m.axis if input_dim(module) == 0 else m.axis  # GPT-2's Conv1D stores (in, out)
            key = f"{m.module}.weight"
            state[key] = state[key].index_select(dim, index).clone()
            if m.axis == 0 and getattr(module, "bias", None) is not None:  # an output's bias goes with it
                state[f"{m.module}.bias"] = state[f"{m.module}.bias"].index_select(0, index).clone()
    weight = next(model.parameters())
    smaller = type(model)(config).to(dtype=weight.dtype)
    smaller.load_state_dict(state, strict=True)
    return smaller.to(weight.device).train(model.training)
