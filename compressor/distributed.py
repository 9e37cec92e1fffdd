"""Data-parallel recovery across processes, with plain torch.distributed.

Launched by `accelerate launch` or `torchrun`, which set RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT. Each process takes its slice of every global batch; the
gradients and the loss are averaged after backward, so every rank sees the global
gradient: Taylor scores, masks and the TA term (global loss, global gradient norm)
come out identical on all ranks without further communication. Rank 0 alone evaluates,
checkpoints and writes outputs. A single process needs none of this.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def average_gradients(params, loss: float) -> float:
    """Average gradients (in place) and the loss over all ranks; return the global loss."""
    world = world_size()
    if world == 1:
        return loss
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads] + [torch.tensor([loss], dtype=grads[0].dtype,
                                                                  device=grads[0].device)])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat[-1].item()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (a signal may reach ranks at different steps)."""
    if not dist.is_initialized():
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_tensors(tensors) -> None:
    """Overwrite each tensor (in place) with rank 0's."""
    if not dist.is_initialized():
        return
    for t in tensors:
        dist.broadcast(t.view(torch.uint8) if t.dtype == torch.bool else t, src=0)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
