"""Checkpoints of a running job, written atomically, for `--resume`.

A checkpoint lives beside the output (`OUT.checkpoint/checkpoint.pt`) until the output
is complete. It holds the trainer state (model with masks, pruner scores, optimizer,
scheduler, RNG, log), the dense results measured before pruning, and a fingerprint of
the model, data and recipe, so a checkpoint of another job is refused on resume.

Sharded runs (`train.parallel: fsdp`): each process writes its trainer state (its rows
of every tensor) to `shard-STEP-rankR.pt`; once all are written, rank 0 replaces
checkpoint.pt, which names the step, and then the older shards are deleted. A crash at
any point leaves a checkpoint.pt whose shards exist. Resuming needs the same number of
processes (each reads its own shard).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from . import distributed as dist
from .errors import UsageError

FILE = "checkpoint.pt"
FORMAT = 1


def checkpoint_dir(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".checkpoint")


def save(folder: Path, state: dict, name: str = FILE) -> Path:
    """Write `state` to folder/checkpoint.pt (or `name`): to a temporary file first, then rename.

    A crash mid-write leaves the previous checkpoint intact.
    """
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / name
    tmp = folder / f".{name}.tmp-{os.getpid()}"
    torch.save({**state, "format": FORMAT}, tmp)
    os.replace(tmp, final)
    return final


def _shard(step: int, rank: int) -> str:
    return f"shard-{step:08d}-rank{rank}.pt"


def save_shard(folder: Path, step: int, state: dict) -> None:
    """This process's trainer state at `step`, beside checkpoint.pt (which rank 0 writes after every shard is)."""
    save(folder, state, _shard(step, dist.rank()))


def drop_old_shards(folder: Path, step: int) -> None:
    """Delete this process's shards of steps before `step` (after checkpoint.pt names `step`)."""
    for path in folder.glob(f"shard-*-rank{dist.rank()}.pt"):
        if path.name != _shard(step, dist.rank()):
            path.unlink(missing_ok=True)


def trainer_state(folder: Path, saved: dict) -> dict:
    """The trainer state of this process: the checkpoint itself, or its shard of a sharded one."""
    world = saved.get("shards")
    if not world:
        return saved
    if world != dist.world_size():
        raise UsageError(f"checkpoint in {folder} was written by {world} processes (train.parallel: fsdp); "
                         f"resume with {world} processes")
    return load(folder, _shard(saved["step"], dist.rank()))


def load(folder: Path, name: str = FILE) -> dict:
    path = folder / name
    if not path.is_file():
        raise UsageError(f"no checkpoint to resume in {folder}; run without --resume to start the job")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign files raise many types
        raise UsageError(f"checkpoint {path} cannot be read ({type(exc).__name__}); "
                         "delete it and run without --resume") from None
    if state.get("format") != FORMAT:
        raise UsageError(f"checkpoint {path} has an unknown format; delete it and run without --resume")
    return state


def verify(state: dict, fingerprint: dict, folder: Path) -> None:
    """Refuse to resume a checkpoint written for another model, dataset or recipe."""
    saved = state.get("fingerprint", {})
    for key in ("model", "data", "recipe"):
        if saved.get(key) != fingerprint[key]:
            raise UsageError(
                f"checkpoint in {folder} was written for another {key}; resume with the same model, "
                "dataset, recipe and flags, or pass --overwrite to start over"
            )


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
