"""Which int4 layout decodes fastest for its quality: tapc's variants against onnxruntime-genai's builder.

    python -m benchmarks.int4_variants OUT --dataset ../shared/data/wikitext2-local \\
        --results benchmarks/results/int4-variants.json

OUT is a finished `tapc compress` output (its `model/` and `onnx/`). From the same fp32
graph and the same GPTQ codes, in one process: tapc's int4 with the LM head and the last
10% of the layers at 8 bits (`accurate`, the default), the same with only the LM head at 8
bits (`head8`), everything at 4 bits as the builder does (`fast`: LM head round-to-nearest,
symmetric), and the builder's own int4 of `OUT/model` (round-to-nearest, block 32). Each is
measured for bytes, perplexity by the run's protocol, top-1 agreement with fp32, and
onnxruntime-genai greedy decode tok/s (128 tokens after a 5-token prompt, median of
`--repeats` rounds taken in turn). The CPU's instruction set is recorded: the 8-bit
MatMulNBits kernels differ most between AVX2 and AVX-512.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.edge_export import NEW_TOKENS, PROMPT, GenaiDecoder, builder_int4, round_robin  # noqa: E402
from compressor import load_model  # noqa: E402
from compressor.data import load_texts, tokenize, windows  # noqa: E402
from compressor.evaluate import perplexity, top1_agreement  # noqa: E402
from compressor.export.gptq import quantize_modules  # noqa: E402
from compressor.export.onnx_outputs import last_layers  # noqa: E402
from compressor.export.quantize import quantize_decoder  # noqa: E402
from compressor.folder import onnx_bytes  # noqa: E402
from compressor.generation import OnnxDecoder  # noqa: E402
from compressor.models import prunable_weights  # noqa: E402
from compressor.patterns import as_rows  # noqa: E402

VARIANTS = {"accurate": {"int8_layers": 0.1, "head_bits": 8}, "head8": {"int8_layers": 0.0, "head_bits": 8},
            "fast": {"int8_layers": 0.0, "head_bits": 4}}


def cpu_isa() -> str:
    flags = Path("/proc/cpuinfo").read_text()
    return "AVX-512" + (" VNNI" if "avx512_vnni" in flags else "") if "avx512f" in flags else "AVX2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dataset", default="../shared/data/wikitext2-local")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    out = args.out
    report = json.loads((out / "report.json").read_text())
    pruned = report["perplexity"]["pruned"]
    loaded = load_model(str(out / "model"))
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    texts = load_texts(args.dataset).texts
    test = tokenize(tokenizer, texts["test"])
    calibration = windows(tokenize(tokenizer, texts["train"]), pruned["seq_len"])[:32]
    calibrated = quantize_modules(model, prunable_weights(model), calibration, block_size=32)
    layers = {name: as_rows(m.weight.detach().float().cpu(), m) for name, m in prunable_weights(model).items()}
    folders = {}
    for name, v in VARIANTS.items():
        folder = out / f"int4-{name}"
        info = quantize_decoder(out / "onnx", folder, 4, layers=layers, calibrated=calibrated,
                                eight_bit=last_layers(model, v["int8_layers"]), head_bits=v["head_bits"])
        folders[name] = (folder, info)
    if not (out / "genai-int4").is_dir():
        builder_int4(out / "model", out / "genai-int4")
    folders["builder"] = (out / "genai-int4", {})

    reference: list = []
    perplexity(model, test, pruned["seq_len"], max_tokens=pruned["max_tokens"], top1=reference)
    rows = {}
    for name, (folder, info) in folders.items():
        top1: list = []
        ppl = perplexity(OnnxDecoder(folder / "model.onnx"), test, pruned["seq_len"], max_tokens=pruned["max_tokens"],
                         top1=top1)
        rows[name] = {"bytes": onnx_bytes(folder / "model.onnx"), "ppl": ppl.ppl,
                      "top1": top1_agreement(top1, reference), "lm_head_bits": info.get("lm_head_bits"),
                      "int8_matrices": info.get("int8_matrices")}
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    genai = {name: GenaiDecoder(folder) for name, (folder, _) in folders.items()}
    speeds = round_robin({name: (lambda g=g: g.decode(prompt, NEW_TOKENS)[1]) for name, g in genai.items()},
                         args.repeats)
    fp32 = pruned["ppl"]
    print(f"CPU: {cpu_isa()}, {torch.get_num_threads()} threads; fp32 PPL {fp32:.2f}")
    print("| variant | MB | PPL (vs fp32) | top-1 | decode tok/s | × builder |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, row in rows.items():
        row["decode_tps"] = speeds[name]
        print(f"| {name} | {row['bytes'] / 1e6:.1f} | {row['ppl']:.2f} ({row['ppl'] / fp32 - 1:+.1%}) | "
              f"{row['top1']:.1%} | {speeds[name]:.1f} | {speeds[name] / speeds['builder']:.2f} |")
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({"cpu": cpu_isa(), "fp32_ppl": fp32, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
