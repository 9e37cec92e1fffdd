"""Sharded recovery with FSDP2 (`train.parallel: fsdp`): nothing per parameter is replicated.

Each decoder block is wrapped with `fully_shard`, then the model itself (embeddings,
final norm and LM head form one group, so tied embeddings stay one tensor). Every
parameter becomes a DTensor split along its first axis over the processes, and with it
everything made from it: the gradients FSDP reduce-scatters, the Adam moments
(`optim.py`), the Taylor scores and the masks (`pruner.py`; the masks are frozen
parameters of the parametrization, so FSDP shards them too). A block's whole weights
exist only while it runs: gathered before, freed after. Sums over all weights (the
threshold's counts, the gradient norm, the TA term's dot products) run over the shards
and are then added across the processes, so a step is the one a single process takes.

Not sharded: the activations (each process runs its share of the batch, as with ddp),
the one-shot methods (SparseGPT and Wanda run layer by layer on every process before
sharding, as with ddp; every process has loaded the whole model by then), and what
follows training: `gather` brings the final weights to rank 0 once, as a plain model,
for the evaluations and exports.
"""

from __future__ import annotations

import math

import torch

from . import distributed as dist
from .calibration import decoder_layers
from .errors import UsageError

ORIGINAL, MASK = ".parametrizations.weight.original", ".parametrizations.weight.0.mask"


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """Wrap each decoder block, then the model, with FSDP2's `fully_shard` (in place)."""
    from torch.distributed.fsdp import fully_shard

    for block in decoder_layers(model):
        fully_shard(block)
    fully_shard(model)
    return model


def check_pattern(pruner) -> None:
    """An N:M group must not straddle two processes' rows (GPT-2's Conv1D groups run along the rows)."""
    if not pruner.pattern.structured:
        return
    m, world = pruner.pattern.m, dist.world_size()
    for name, weight in pruner.weights.items():
        rows = weight.shape[0]
        if pruner.input_dims[name] == 0 and math.ceil(rows / world) % m:
            raise UsageError(f"{name} has {rows} rows: split over {world} processes its {pruner.pattern} groups "
                             f"would straddle two processes; use train.parallel: ddp or another process count")


@torch.no_grad()
def gather(model: torch.nn.Module, plain) -> torch.nn.Module | None:
    """The trained weights, whole and with `w * mask` baked in, in `plain()` (an unsharded model of the same
    architecture, e.g. a copy of the dense one) on rank 0.

    Every process must call it (each tensor is all-gathered in turn); the others get None.
    """
    state = {}
    for key, value in model.state_dict().items():
        whole = value.full_tensor() if dist.is_sharded(value) else value
        if dist.is_main():
            state[key] = whole.detach().to("cpu", copy=True)
    if not dist.is_main():
        return None
    for key in [k for k in state if k.endswith(ORIGINAL)]:
        base = key.removesuffix(ORIGINAL)
        # + 0.0 turns the -0.0 of a masked negative weight into +0.0, as Pruner.finalize does.
        state[base + ".weight"] = (state.pop(key) * state.pop(base + MASK)).add_(0.0)
    net = plain()
    net.load_state_dict(state)
    return net
