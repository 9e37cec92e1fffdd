"""Distillation from the dense model: the recovery loss that keeps the model the user gave.

Plain cross-entropy on the training text (`train.loss: ce`) repairs the pruned model by
teaching it that text: perplexity on the same kind of text can end below the dense
model's while the model drifts away from what it was (its style, its chat behaviour).
`kd` instead matches the dense model's next-token distribution on the same windows,
KL(teacher || student) over the full vocabulary at every position; `ce+kd` mixes both.

The teacher is a frozen copy of the dense model taken before pruning, run on the same
batch in the same step without gradients: one extra forward pass per micro-batch and one
more copy of the weights, nothing cached between steps. It is not checkpointed: a
resumed run loads the dense model again and copies it before the checkpoint is applied.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .recipe import TrainConfig


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of T^2 * KL(softmax(teacher/T) || softmax(student/T)), full vocabulary."""
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def teacher_copy(model) -> torch.nn.Module:
    """A frozen copy of `model` (in eval mode, no gradients) to distill from."""
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


def uses_teacher(config: TrainConfig) -> bool:
    return config.loss != "ce"


def recovery_loss(model, teacher, ids: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The loss one micro-batch is trained on, as `train.loss` says."""
    out = model(input_ids=ids, labels=None if config.loss == "kd" else ids)
    if not uses_teacher(config):
        return out.loss
    with torch.no_grad():
        target = teacher(input_ids=ids).logits
    term = kd_loss(out.logits, target, config.kd_temperature)
    if config.loss == "kd":
        return term
    return (1.0 - config.kd_weight) * out.loss + config.kd_weight * term


def dense_loss(config: TrainConfig, dense_ce: float) -> float:
    """The dense model's value of the training loss, given its cross-entropy (its KL to itself is 0)."""
    return {"ce": dense_ce, "kd": 0.0, "ce+kd": (1.0 - config.kd_weight) * dense_ce}[config.loss]
