"""Data-parallel recovery across processes, with plain torch.distributed.

Launched by `accelerate launch` or `torchrun`, which set RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT. Each process takes its slice of every global batch; the
gradients and the loss are averaged after backward, so every rank sees the global
gradient: Taylor scores, masks and the TA term (global loss, global gradient norm)
come out identical on all ranks without further communication. Rank 0 alone evaluates,
checkpoints and writes outputs. A single process needs none of this.

With `train.parallel: fsdp` (`sharding.py`) each process holds only its shard of every
weight, gradient, Adam moment, Taylor score and mask (DTensors, split along the first
axis). Elementwise work then runs on `local(t)`, the process's own rows, and every sum
over all weights (counts, norms, dot products) is finished with `sum_shards`.
"""

from __future__ import annotations

import functools
import gc
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


_owned = False  # the process group was started here, and `shutdown` ends it


def init_from_env(device: torch.device) -> None:
    global _owned
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        _owned = True


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


def is_sharded(t) -> bool:
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (a view: writing it writes the shard); `t` itself otherwise."""
    if not isinstance(t, DTensor):
        return t
    with torch.no_grad():
        return t.to_local()


def shard_rows(rows: int) -> tuple[int, int]:
    """[start, stop) of this process's rows of a tensor sharded along its first axis (torch.chunk's split)."""
    chunk = -(-rows // world_size())
    start = min(rank() * chunk, rows)
    return start, min(start + chunk, rows)


def _comm_device() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def sum_shards(values: list[float] | list[int]) -> list:
    """Each value summed over all processes (exactly for integers, in float64 otherwise)."""
    if not dist.is_initialized():
        return list(values)
    exact = all(isinstance(v, int) for v in values)
    t = torch.tensor(values, dtype=torch.int64 if exact else torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every process's 1-D tensor, concatenated in rank order (sizes may differ)."""
    if not dist.is_initialized():
        return t
    device = _comm_device()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([t.numel()], device=device))
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=t.dtype, device=device)
    padded[: t.numel()] = t.to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)]).to(t.device)


def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """Clip the gradients to a global norm of `max_norm`; returns the norm before clipping.

    Sharded gradients: the squared norm of each shard, summed over the processes, as one
    process would compute it over whole gradients (torch's own function otherwise).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    with torch.no_grad():
        square = torch.stack([local(g).double().pow(2).sum() for g in grads]).sum().item()  # one sync
        norm = torch.tensor(sum_shards([square])[0]).sqrt().float()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            local(g).mul_(coef.to(g.dtype))
    return norm


def ends_process_group(fn):
    """`fn` ends, returning or failing, with `shutdown()`: a gloo group left to the interpreter's exit may
    abort the process (SIGABRT) after the job is done."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            shutdown()
    return wrapper


def shutdown() -> None:
    """End the process group `init_from_env` started; one the caller started is left to the caller."""
    global _owned
    if _owned and dist.is_initialized():
        gc.collect()  # sharded tensors in reference cycles would outlive the group: the same abort at exit
        dist.destroy_process_group()
    _owned = False
