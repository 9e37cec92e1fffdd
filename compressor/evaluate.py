"""Perplexity by the protocol in docs/method.md (Perplexity protocol).

The split is one token stream. Without a stride it is cut into non-overlapping windows
of `seq_len` tokens (a shorter last window is kept if it predicts at least one token);
every token but the first of each window is predicted. With a stride, windows of
`seq_len` start every `stride` tokens and each token is scored once, with as much
left context as the window gives (the Hugging Face sliding-window recipe).
PPL = exp(mean NLL over all predicted tokens).

`evaluate_model` applies it to any saved model (`tapc eval`): a Hugging Face directory
or Hub id, a `.gguf`, a sparse folder, or an ONNX export, so dense, pruned, ONNX and
int8/int4 numbers are comparable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int
    seq_len: int
    stride: int | None
    max_tokens: int | None
    # Against a reference model (`perplexity(..., reference=)`), e.g. the dense one: drift.
    kl: float | None = None  # mean KL(reference || model) per predicted token (nats), full vocabulary
    agreement: float | None = None  # fraction of predicted tokens where both models' top-1 token agrees

    @property
    def protocol(self) -> str:
        kind = f"sliding windows, stride {self.stride}" if self.stride else "non-overlapping windows"
        limit = f", first {self.max_tokens} tokens only" if self.max_tokens else ""
        return f"{kind} of {self.seq_len} tokens{limit}"

    def to_dict(self) -> dict:
        return {**asdict(self), "protocol": self.protocol}


def _spans(n: int, seq_len: int, stride: int | None) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) for each window over a stream of n tokens."""
    spans = []
    if stride is None:
        for begin in range(0, n - 1, seq_len):
            end = min(begin + seq_len, n)
            if end - begin >= 2:
                spans.append((begin, end, begin + 1))
        return spans
    scored_to = 1  # token 0 is never predicted
    for begin in range(0, n - 1, stride):
        end = min(begin + seq_len, n)
        spans.append((begin, end, max(scored_to, begin + 1)))
        scored_to = end
        if end == n:
            break
    return spans


@torch.no_grad()
def perplexity(
    model,
    tokens: torch.Tensor,
    seq_len: int,
    *,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    progress=None,
    top1: list | None = None,
    reference=None,
) -> Perplexity:
    """Perplexity of `model` on a 1-D token stream.

    Given a list as `top1`, the model's most likely next token at every scored position
    is appended to it (one tensor per window), in the order the tokens are scored, so
    two models' predictions can be compared (`top1_agreement`). Given a `reference`
    model (same vocabulary), also how far `model` drifted from it on the same
    positions: mean KL(reference || model) over the full vocabulary and top-1 agreement.
    """
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    if tokens.numel() < 2:
        raise ValueError("need at least 2 tokens to evaluate perplexity")
    spans = _spans(tokens.numel(), seq_len, stride)
    was_training = model.training
    model.eval()
    total_nll, total_tokens, total_kl, agree = 0.0, 0, 0.0, 0
    # Windows of the same length are batched; only the last one can be shorter.
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:
        groups.setdefault(span[1] - span[0], []).append(span)
    done = 0
    for length, group in groups.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            ids = torch.stack([tokens[b:e] for b, e, _ in chunk]).to(device)
            logits = model(input_ids=ids).logits.float()
            logp = F.log_softmax(logits[:, :-1], dim=-1)
            nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # nll[j] predicts ids[j+1]
            ref = None if reference is None else _reference_logp(reference, ids, logp.shape[-1])
            for row, (begin, _, first) in enumerate(chunk):
                at = slice(first - begin - 1, None)
                scored = nll[row, at]
                if top1 is not None:
                    top1.append(logits[row, first - begin - 1 : -1].argmax(-1).cpu())
                if ref is not None:
                    total_kl += (ref[row, at].exp() * (ref[row, at] - logp[row, at])).sum(-1).double().sum().item()
                    agree += int((ref[row, at].argmax(-1) == logp[row, at].argmax(-1)).sum())
                total_nll += scored.double().sum().item()
                total_tokens += scored.numel()
            done += len(chunk)
            if progress:
                progress({"stage": "eval", "done": done, "total": len(spans)})
    model.train(was_training)
    mean = total_nll / total_tokens
    drift = {} if reference is None else {"kl": total_kl / total_tokens, "agreement": agree / total_tokens}
    return Perplexity(
        ppl=math.exp(mean), nll=mean, tokens=total_tokens, windows=len(spans),
        seq_len=seq_len, stride=stride, max_tokens=max_tokens, **drift,
    )


def _reference_logp(reference, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """The reference model's next-token log-probabilities for `ids` (all but the last position)."""
    logits = reference(input_ids=ids.to(_device_of(reference))).logits.float()[:, :-1]
    if logits.shape[-1] != vocab:
        raise _vocabularies_differ(logits.shape[-1], vocab)
    return F.log_softmax(logits, dim=-1).to(ids.device)


def _vocabularies_differ(reference: int, model: int):
    from .errors import UsageError

    return UsageError(f"the reference model predicts {reference} tokens, the model {model}; give a reference with "
                      "the same tokenizer (the dense model the run started from)")


def _device_of(model) -> torch.device:
    params = getattr(model, "parameters", None)
    return next(params()).device if callable(params) else torch.device("cpu")


def top1_agreement(predictions: list, reference: list) -> float:
    """Fraction of scored positions where two models' most likely next tokens agree."""
    ours, theirs = torch.cat(predictions), torch.cat(reference)
    if ours.shape != theirs.shape:
        raise ValueError(f"predictions cover {ours.numel()} positions, the reference {theirs.numel()}")
    return float((ours == theirs).double().mean())


@torch.no_grad()
def mean_loss(model, batches: torch.Tensor, batch_size: int, device) -> float:
    """Mean next-token loss over a tensor of windows (validation loss during training)."""
    was_training = model.training
    model.eval()
    losses = []
    for i in range(0, len(batches), batch_size):
        ids = batches[i : i + batch_size].to(device)
        losses.append(model(input_ids=ids, labels=ids).loss.item())
    model.train(was_training)
    return sum(losses) / len(losses)


def evaluate_model(spec: str, dataset: str = "wikitext2", *, seq_len: int | None = None, stride: int | None = None,
                   max_tokens: int | None = None, batch_size: int = 4, reference: str | None = None,
                   progress=None) -> dict:
    """Perplexity of any saved model on the test split of `dataset` (docs/method.md, Perplexity protocol).

    With `reference` (any model `open_decoder` reads, usually the dense one), also the
    drift from it on the same tokens: mean KL(reference || model) and top-1 agreement.
    """
    from .data import load_texts, tokenize
    from .errors import UsageError
    from .generation import open_decoder
    from .models import window_length

    notify = progress or (lambda event: None)
    notify({"stage": "load", "model": spec})
    decoder, tokenizer, source = open_decoder(spec)
    model = decoder.model if decoder.kind == "pytorch" else decoder
    seq_len = window_length(model, seq_len)
    if stride and stride > seq_len:
        raise UsageError(f"--stride {stride} exceeds the window of {seq_len}; use a stride <= the window")
    notify({"stage": "data", "dataset": dataset})
    texts = load_texts(dataset)
    tokens = tokenize(tokenizer, texts.texts["test"])
    if tokens.numel() < 2:
        raise UsageError("the test text has fewer than 2 tokens; give more text in test.txt")
    ref_model = ref_source = None
    if reference is not None:
        notify({"stage": "load", "model": reference})
        ref_decoder, _, ref_source = open_decoder(reference)
        ref_model = ref_decoder.model if ref_decoder.kind == "pytorch" else ref_decoder
        sizes = [getattr(getattr(m, "config", None), "vocab_size", None) for m in (ref_model, model)]
        if None not in sizes and sizes[0] != sizes[1]:
            raise _vocabularies_differ(*sizes)
    result = perplexity(model, tokens, seq_len, stride=stride, max_tokens=max_tokens, batch_size=batch_size,
                        progress=lambda e: notify({**e, "stage": "eval"}), reference=ref_model)
    out = {"model": source, "dataset": texts.source, "perplexity": result.to_dict()}
    if ref_source is not None:
        out["reference"] = ref_source
    return out


@dataclass
class Evaluation:
    """Perplexity by the run's protocol: `run(model_like, top1)` -> Perplexity, and the fp32 model's own."""

    run: Callable
    reference: object  # Perplexity of the PyTorch model
    reference_top1: list

    def measure(self, model_like) -> dict:
        """Perplexity of `model_like`, its change from the PyTorch model's, and their top-1 agreement."""
        top1: list = []
        ppl = self.run(model_like, top1)
        return {"perplexity": ppl.to_dict(), "ppl_increase": ppl.ppl / self.reference.ppl - 1.0,
                "top1_agreement": top1_agreement(top1, self.reference_top1)}
