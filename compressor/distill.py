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

For instruct and chat models the training text alone rarely shows the behaviour users
keep the model for: `data.self_distill: N` has the dense model answer the first N of
tapc's instruction prompts (greedy, in its chat template) and mixes those conversations
into the training windows, so the student is distilled on them too.
"""

from __future__ import annotations

import copy
from importlib import resources

import torch
import torch.nn.functional as F

from .recipe import TrainConfig

HELD_OUT = 16  # the last prompts of tapc's instruction set are never trained on: drift is measured there
ANSWER_TOKENS = 128  # longest teacher answer in self-distillation


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


def recovery_loss(model, teacher, ids: torch.Tensor, config: TrainConfig, *, score: str | None = None,
                  generator: torch.Generator | None = None):
    """The loss one micro-batch is trained on, as `train.loss` says.

    `score` (`prune.score_loss`: `ce` or `sampled`): the pair (that loss, the loss Taylor scores take
    their gradient from) of the same forward pass, so the scores need no second forward."""
    labels = ids if config.loss != "kd" or score == "ce" else None
    out = model(input_ids=ids, labels=labels)
    term = out.loss
    if uses_teacher(config):
        with torch.no_grad():
            target = teacher(input_ids=ids).logits
            if hasattr(teacher, "reshard"):  # FSDP2: never running backward, it would keep its outer group whole
                teacher.reshard()
        term = kd_loss(out.logits, target, config.kd_temperature)
        if config.loss != "kd":
            term = (1.0 - config.kd_weight) * out.loss + config.kd_weight * term
    if score is None:
        return term
    return term, out.loss if score == "ce" else sampled_ce(out.logits, generator)


def sampled_ce(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of tokens drawn from the model's own prediction (detached): the labels
    of the true Fisher. Its gradient has mean zero; its size says how much a weight moves the model's
    output distribution, whatever the text's next token was."""
    logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    with torch.no_grad():
        target = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
    return F.cross_entropy(logits, target)


def dense_loss(config: TrainConfig, dense_ce: float) -> float:
    """The dense model's value of the training loss, given its cross-entropy (its KL to itself is 0)."""
    return {"ce": dense_ce, "kd": 0.0, "ce+kd": (1.0 - config.kd_weight) * dense_ce}[config.loss]


def instruction_prompts() -> list[str]:
    """tapc's instruction prompts, in order (the last `HELD_OUT` only for measuring)."""
    text = (resources.files("compressor") / "prompts" / "instructions.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def chat_stream(model, tokenizer, prompts: list[str], max_new_tokens: int = ANSWER_TOKENS) -> torch.Tensor:
    """Each prompt as a user turn in the chat template, then `model`'s greedy answer; one token stream."""
    from .generation import TorchDecoder, generate

    decoder, stream = TorchDecoder(model), []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        stream += [*ids, *generate(decoder, list(ids), max_new_tokens, eos_token_id=tokenizer.eos_token_id).tokens]
    return torch.tensor(stream, dtype=torch.long)


def mix_windows(train: torch.Tensor, extra: torch.Tensor, share: float) -> torch.Tensor:
    """`train` plus `extra` repeated until it is about `share` of all windows (at least once)."""
    repeats = max(1, round(share / (1.0 - share) * len(train) / max(1, len(extra))))
    return torch.cat([train, extra.repeat(repeats, 1)])
