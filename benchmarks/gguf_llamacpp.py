"""Greedy text of tapc's GGUF files in llama.cpp against PyTorch on the safetensors model (run by hand).

    python -m benchmarks.gguf_llamacpp OUT/model OUT/gguf/model-f16.gguf OUT/gguf/model-q8_0.gguf \
        [--llama-simple PATH] [--tokens 32] [--out results.json]

`llama-simple` is llama.cpp's minimal greedy generator (build llama.cpp yourself, e.g.
`cmake -B build && cmake --build build --target llama-simple`); it is not a tapc
dependency. For each of tapc's parity prompts it compares llama.cpp's continuation with
`tapc generate`'s (PyTorch, greedy, no BOS for SmolLM2 as its GGUF says) as text.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

from compressor.export.parity import PROMPTS
from compressor.generation import TorchDecoder, generate
from compressor.models import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="the safetensors model directory (OUT/model)")
    p.add_argument("ggufs", nargs="+", help="GGUF files written from it")
    p.add_argument("--llama-simple", default=shutil.which("llama-simple") or "llama-simple")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    loaded = load_model(args.model)
    tok, reference = loaded.tokenizer, TorchDecoder(loaded.model)
    expected = {prompt: tok.decode(generate(reference, tok(prompt, add_special_tokens=False)["input_ids"],
                                            args.tokens).tokens) for prompt in PROMPTS}
    results = {"pytorch": expected, "llama.cpp": {}}
    for path in args.ggufs:
        runs = {}
        for prompt in PROMPTS:
            done = subprocess.run([args.llama_simple, "-m", path, "-n", str(args.tokens), prompt],
                                  capture_output=True, text=True, check=True)
            text = done.stdout[len(prompt):]
            runs[prompt] = {"text": text, "identical": text.strip() == expected[prompt].strip()}
        results["llama.cpp"][path] = runs
        same = sum(r["identical"] for r in runs.values())
        print(f"{path}: greedy text identical to PyTorch for {same}/{len(runs)} prompts")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
