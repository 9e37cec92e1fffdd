"""Checkpoints of a running job, written atomically, for `--resume`.

A checkpoint lives beside the output (`OUT.checkpoint/checkpoint.pt`) until the output
is complete. It holds the trainer state (model with masks, pruner scores, optimizer,
scheduler, RNG, log), the dense results measured before pruning, and a fingerprint of
the model, data and recipe, so a checkpoint of another job is refused on resume.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .errors import UsageError

FILE = "checkpoint.pt"
FORMAT = 1


def checkpoint_dir(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".checkpoint")


def save(folder: Path, state: dict) -> Path:
    """Write `state` to folder/checkpoint.pt: to a temporary file first, then rename.

    A crash mid-write leaves the previous checkpoint intact.
    """
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / FILE
    tmp = folder / f".{FILE}.tmp-{os.getpid()}"
    torch.save({**state, "format": FORMAT}, tmp)
    os.replace(tmp, final)
    return final


def load(folder: Path) -> dict:
    path = folder / FILE
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
