"""Does the export's parity check catch real export bugs, on SmolLM2-135M as on the tiny test models?

    python -m benchmarks.parity_mutations --out out/parity --results benchmarks/results/parity-mutations.json

SmolLM2-135M is pruned to 30% by one-shot magnitude (the weights the exporter reads are a
pruned model's, as in a run), exported by onnxruntime-genai's builder, and checked by
`check_logits` as `tapc compress` checks it. Then each export bug of `MUTATIONS`
(`compressor/testing.py`, which the tests seed on tiny models too) is seeded
for real and checked the same way: in the saved model the exporter reads (`rope_theta`,
`rotary_permutation`, `norm_weight`) or in how the graph is fed (`cache_one_short`,
`first_token_masked`); the PyTorch model stays correct. Prints one row per export: the
largest |logit difference|, its tolerance, their ratio, and the verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.testing import MUTATIONS, SMOLLM2_MISSING, mutated_decoder, smollm2_gguf  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/parity"))
    parser.add_argument("--results", type=Path)
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--only", nargs="*", help="mutations to run (default: none and all)")
    args = parser.parse_args()

    from compressor import load_model
    from compressor.export.parity import check_logits
    from compressor.models import prunable_weights

    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit(SMOLLM2_MISSING)
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
