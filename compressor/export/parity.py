"""Does the exported decoder compute what the PyTorch model computes?

Run on every export, collecting every mismatch before deciding:

- `check_logits`: fp32 ONNX against PyTorch fp32 on several shapes, each a prefill and
  then decode steps that read a non-empty cache, so the cache path is checked, not only
  the first call. Two fp32 implementations that sum in different orders (onnxruntime's
  fused kernels, PyTorch's, each as this CPU's instruction set computes them) differ by
  rounding, and how much depends on the model and the input, not only on the export.
  So each case's tolerance is derived from the case itself:

      tolerance = max(atol, rtol * max|logit|, FP32_FACTOR * |PyTorch fp32 - PyTorch float64|)

  The last term is PyTorch's own fp32 error on that case, measured against the same
  model run in float64 (converted in place and back, where the machine has room): an
  export as accurate as PyTorch, give or take the order of its sums, is within a few
  times that of PyTorch. The middle term scales with the logits (rounding is relative;
  a model with logits of 160 rounds 5 times as coarsely as one with logits of 30).
  The bugs an export can have (a rotary permutation or base that is wrong, a cache
  position off by one, a wrong attention mask, a norm weight left out) move the logits
  by a sizeable fraction of their scale, far beyond either term (seeded by
  compressor.testing, measured by tests/test_parity.py and benchmarks/parity_mutations.py).
  The report keeps every figure it compared.
- `check_greedy`: greedy continuations of `PROMPTS` by both, token for token. Two
  models whose logits agree within the tolerance can still pick different tokens where
  two candidates tie; a divergence is only a failure when PyTorch preferred its token by
  more than twice the largest case tolerance (`margin`): logits that each agree within
  a tolerance can swap two tokens only if those were within twice it of each other.
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
# How many times PyTorch's own fp32 error an fp32 export may be from PyTorch fp32. Measured ratios on
# SmolLM2-135M (onnxruntime-genai's fused kernels): 1.1-1.8 on AVX-512 and an emulated Haswell, 4.5 on an
# AVX2 machine; 0.7-1.5 on the tiny test models. The seeded export bugs sit orders of magnitude above it.
FP32_FACTOR = 10.0


def reference_logits(model, cases=LOGIT_CASES, seed: int = 0, exact: bool = True) -> list[tuple]:
    """(case, token ids, PyTorch fp32 logits, float64 logits or None) per case that fits the model's context.

    The float64 logits come from the model itself, converted in place to float64 and back
    (exact: every fp32 value is a float64 value), where the CPU has room for the 4 more
    bytes a parameter; on another device, or without the room, they are None.
    """
    from ..memory import available_bytes
    from ..models import model_context

    gen = torch.Generator().manual_seed(seed)
    context = model_context(model)
    device = next(model.parameters()).device
    runs = []
    for batch, prefill, steps in cases:
        if context and prefill + steps > context:
            continue
        ids = torch.randint(model.config.vocab_size, (batch, prefill + steps), generator=gen)
        with torch.no_grad():
            runs.append([(batch, prefill, steps), ids, model(input_ids=ids.to(device), use_cache=False).logits.float().cpu(),
                         None])
    params = sum(p.numel() for p in model.parameters())
    free = available_bytes(torch.device("cpu"))
    if not exact or device.type != "cpu" or free is None or 4 * params > free // 2:
        return [tuple(run) for run in runs]
    dtype = next(model.parameters()).dtype
    try:
        model.to(torch.float64)
        with torch.no_grad():
            for run in runs:
                run[3] = model(input_ids=run[1], use_cache=False).logits
    finally:
        model.to(dtype)
    return [tuple(run) for run in runs]


def check_logits(model, decoder, cases=LOGIT_CASES, seed: int = 0, *, atol: float = 1e-3, rtol: float = 1e-3,
                 exact: bool = True, references: list[tuple] | None = None) -> dict:
    """`decoder` (prefill, then one token at a time) against `model` on whole sequences, case by case.

    Per case: the max |logit difference| of the prefill and of the decode steps, the
    largest |logit|, PyTorch fp32's own max error against float64 (`exact`, where memory
    allows; else None), the tolerance derived from them and whether the case passed.
    `references`: `reference_logits` computed beforehand (before the decoder took its memory).
    """
    results = []
    for (batch, prefill, steps), ids, expected, truth in references or reference_logits(model, cases, seed, exact):
        logits, cache = decoder.forward(ids[:, :prefill], decoder.empty_cache(batch))
        parts = [logits]
        for t in range(prefill, prefill + steps):
            logits, cache = decoder.forward(ids[:, t : t + 1], cache)
            parts.append(logits)
        got = torch.cat(parts, dim=1) if all(p.shape[0] == batch for p in parts) else None
        fp32_error = None if truth is None else float((expected.double() - truth).abs().max())
        scale = float((expected if truth is None else truth).abs().max())
        tolerance = max(atol, rtol * scale, FP32_FACTOR * (fp32_error or 0.0))
        entry = {"batch": batch, "prefill": prefill, "decode_steps": steps,
                 "max_abs_diff_prefill": _max_diff(parts[0], expected[:, :prefill]),
                 "max_abs_diff_decode": max(_max_diff(p, expected[:, t : t + 1])
                                            for t, p in enumerate(parts[1:], start=prefill)),
                 "max_abs_logit": scale, "pytorch_fp32_error": fp32_error,
                 "export_fp32_error": None if truth is None or got is None or got.shape != truth.shape
                 else float((got.double() - truth).abs().max()),
                 "tolerance": tolerance}
        entry["max_abs_diff"] = max(entry["max_abs_diff_prefill"], entry["max_abs_diff_decode"])
        entry["passed"] = entry["max_abs_diff"] <= tolerance
        results.append(entry)
    worst = max(r["max_abs_diff"] for r in results)
    return {"cases": results, "max_abs_diff": worst, "atol": atol, "rtol": rtol, "fp32_factor": FP32_FACTOR,
            "exact_reference": all(r["pytorch_fp32_error"] is not None for r in results),
            "tolerance": max(r["tolerance"] for r in results),
            "worst_fraction_of_tolerance": max(r["max_abs_diff"] / r["tolerance"] for r in results),
            "passed": all(r["passed"] for r in results)}


def _max_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    if got.shape != expected.shape:
        return float("inf")
    return float((got - expected).abs().max())


def logit_failures(result: dict) -> list[str]:
    """One phrase per case of `check_logits` beyond its tolerance."""
    return [f"{c['batch']}x{c['prefill']}+{c['decode_steps']}: {c['max_abs_diff']:.3g} > tolerance "
            f"{c['tolerance']:.3g}" for c in result["cases"] if not c["passed"]]


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


def greedy_failures(results: list[dict], tolerance: float) -> list[dict]:
    """Divergences that a near-tie cannot explain: PyTorch preferred its token by more than 2 `tolerance`."""
    return [r for r in results if not r["identical"] and not abs(r["margin"]) <= 2 * tolerance]
