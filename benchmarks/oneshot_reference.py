"""Reference check of the peers: tapc's SparseGPT and Wanda against llm-compressor's, same calibration windows.

Two venvs, never one: llm-compressor is not a tapc dependency.

    # 1. tapc's venv: the dense SmolLM2 in HF layout and the 32 x 512 windows tapc's oneshot recipes draw (seed 0)
    .venv/bin/python -m benchmarks.oneshot_reference prepare --out out/ref
    # 2. a separate venv with llm-compressor (pin torch==2.13.0 in the same pip command)
    python3 -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor
    /tmp/llmc/bin/python benchmarks/oneshot_reference.py llmcompressor --out out/ref --method sparsegpt
    /tmp/llmc/bin/python benchmarks/oneshot_reference.py llmcompressor --out out/ref --method wanda
    # 3. tapc measures both folders and its own runs with one protocol
    tapc eval out/ref/llmc-sparsegpt --dataset ../shared/data/wikitext2-local --seq-len 512 --eval-tokens 20480
    tapc compress out/ref/dense --recipe oneshot-sparsegpt --dataset ../shared/data/wikitext2-local --out out/ref/tapc-sparsegpt

Results of the run of 2026-11-28: `benchmarks/results/oneshot-reference.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# Every projection of the decoder layers, nothing else. llm-compressor's default targets
# ("Linear") include lm_head, which SmolLM2 ties to its embeddings: half the
# embedding table would be pruned too.
TARGETS = [r"re:.*layers\.\d+\..*(q|k|v|o|gate|up|down)_proj$"]
IGNORE = ["re:.*lm_head"]


def prepare(out: Path, dataset: str, windows: int, seq_len: int, seed: int) -> None:
    import torch

    from compressor.calibration import sample_windows
    from compressor.data import load_texts, tokenize
    from compressor.data import windows as split
    from compressor.models import load_model
    from compressor.testing import smollm2_gguf

    loaded = load_model(str(smollm2_gguf()))
    loaded.model.save_pretrained(out / "dense")
    loaded.tokenizer.save_pretrained(out / "dense")
    train = tokenize(loaded.tokenizer, load_texts(dataset).texts["train"])
    torch.save(sample_windows(split(train, seq_len), windows, seed), out / "calibration.pt")


def llmcompressor_oneshot(out: Path, method: str, sparsity: float) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calibration = torch.load(out / "calibration.pt")
    data = Dataset.from_dict({"input_ids": calibration.tolist(),
                              "attention_mask": torch.ones_like(calibration).tolist()})
    model = AutoModelForCausalLM.from_pretrained(out / "dense", dtype=torch.float32).eval()
    args = dict(sparsity=sparsity, mask_structure="0:0", targets=TARGETS, ignore=IGNORE)
    modifier = (SparseGPTModifier(**args, block_size=128, dampening_frac=0.01) if method == "sparsegpt"
                else WandaPruningModifier(**args))
    started = time.perf_counter()
    model = oneshot(model=model, dataset=data, recipe=modifier, num_calibration_samples=len(calibration),
                    max_seq_length=calibration.shape[1], batch_size=1, shuffle_calibration_samples=False)
    seconds = time.perf_counter() - started
    folder = out / f"llmc-{method}"
    model.save_pretrained(folder, save_compressed=False)
    AutoTokenizer.from_pretrained(out / "dense").save_pretrained(folder)
    (out / f"llmc-{method}.json").write_text(json.dumps({"method": method, "seconds": seconds, "modifier": args}))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["prepare", "llmcompressor"])
    p.add_argument("--out", type=Path, default=Path("out/ref"))
    p.add_argument("--method", choices=["sparsegpt", "wanda"], default="sparsegpt")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--dataset", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext2-local"))
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step == "prepare":
        prepare(args.out, args.dataset, args.windows, args.seq_len, args.seed)
    else:
        llmcompressor_oneshot(args.out, args.method, args.sparsity)


if __name__ == "__main__":
    main()
