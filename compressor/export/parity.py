"""Does the exported decoder compute what the PyTorch model computes?

Run on every export, collecting every mismatch before deciding:

- `check_logits`: fp32 ONNX against PyTorch on several shapes, each a prefill and then
  decode steps that read a non-empty cache, so the cache path is checked, not only the
  first call.
- `check_greedy`: greedy continuations of `PROMPTS` by both, token for token. Two
  models whose logits agree to 1e-5 can still pick different tokens where two
  candidates tie; a divergence is only a failure when PyTorch preferred its token by
  more than twice the logit tolerance (`margin`): logits that each agree within atol
  can swap two tokens only if those were within 2 atol of each other.
- For int8/int4 models the same greedy comparison says whether and where the text
  diverges (expected, reported, never a failure); their perplexity and top-1 agreement
  come from the evaluation in `__init__`.
"""

from __future__ import annotations

import torch

from ..generation import generate

PROMPTS = ("The history of the city", "In machine learning, a model", "Once upon a time, there was")
GREEDY_TOKENS = 32
# (batch, prefill length, decode steps): none of size 1 in both axes, several batch sizes.
LOGIT_CASES = ((1, 5, 3), (3, 17, 2), (2, 40, 2))


def check_logits(model, decoder, cases=LOGIT_CASES, seed: int = 0) -> dict:
    """Max |logit difference| of `decoder` (prefill, then one token at a time) against `model` on whole sequences."""
    from ..models import model_context

    gen = torch.Generator().manual_seed(seed)
    context = model_context(model)
    device = next(model.parameters()).device
    results = []
    for batch, prefill, steps in cases:
        if context and prefill + steps > context:
            continue
        ids = torch.randint(model.config.vocab_size, (batch, prefill + steps), generator=gen)
        with torch.no_grad():
            expected = model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()
        logits, cache = decoder.forward(ids[:, :prefill], decoder.empty_cache(batch))
        diffs = [_max_diff(logits, expected[:, :prefill])]
        for t in range(prefill, prefill + steps):
            logits, cache = decoder.forward(ids[:, t : t + 1], cache)
            diffs.append(_max_diff(logits, expected[:, t : t + 1]))
        results.append({"batch": batch, "prefill": prefill, "decode_steps": steps,
                        "max_abs_diff_prefill": diffs[0], "max_abs_diff_decode": max(diffs[1:])})
    worst = max(max(r["max_abs_diff_prefill"], r["max_abs_diff_decode"]) for r in results)
    return {"cases": results, "max_abs_diff": worst}


def _max_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    if got.shape != expected.shape:
        return float("inf")
    return float((got - expected).abs().max())


def prompt_ids(tokenizer, prompts=PROMPTS) -> list[list[int]]:
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]


def check_greedy(reference, candidate, prompts: list[list[int]], tokenizer=None, new_tokens: int = GREEDY_TOKENS) -> list[dict]:
    """Greedy continuations by `reference` (PyTorch) and `candidate`, compared token for token.

    Per prompt: `identical`, and at a divergence its position (`diverges_at`), both
    tokens, and PyTorch's logit margin of its token over the candidate's (`margin`).
    EOS is ignored so that every prompt compares `new_tokens` tokens.
    """
    results = []
    for ids in prompts:
        ours = generate(reference, ids, new_tokens).tokens
        theirs = generate(candidate, ids, new_tokens).tokens
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        entry = {"prompt_tokens": len(ids), "new_tokens": new_tokens, "identical": at is None, "diverges_at": at}
        if tokenizer is not None:
            entry["prompt"] = tokenizer.decode(ids)
            entry["text"] = tokenizer.decode(theirs)
        if at is not None:
            logits, _ = reference.forward(torch.tensor([ids + ours[:at]]), reference.empty_cache(1))
            last = logits[0, -1]
            entry.update(token=ours[at], candidate_token=theirs[at], margin=float(last[ours[at]] - last[theirs[at]]))
        results.append(entry)
    return results


def greedy_failures(results: list[dict], atol: float) -> list[dict]:
    """Divergences that a near-tie cannot explain: PyTorch preferred its token by more than 2 `atol`."""
    return [r for r in results if not r["identical"] and not abs(r["margin"]) <= 2 * atol]
