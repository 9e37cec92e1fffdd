"""Any saved model, after the fact: its perplexity (`tapc eval`) and its sparsity (`tapc report`).

`evaluate_model` takes a Hugging Face directory or Hub id, a `.gguf`, a sparse
artifact folder, or an ONNX model, and measures perplexity by the same protocol as
`compress`, so dense, pruned, ONNX and int8 numbers are comparable.

`inspect_checkpoint` counts zeros in the weight files themselves. Which tensors are
projections comes from the architecture (the model built on the meta device), never
from tapc's metadata; metadata only says which pattern a run claimed, and that claim
is checked against the tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .data import load_texts, tokenize
from .errors import UsageError
from .evaluate import perplexity
from .onnx_export import ONNX_NAME, OnnxCausalLM, onnx_bytes
from .patterns import Pattern, input_dim, parse_pattern, violations
from .report import sparsity_summary
from .sparse_format import FILENAME as SPARSE_FILE
from .sparse_format import is_sparse, load_sparse


def _onnx_path(spec: str) -> Path | None:
    path = Path(spec).expanduser()
    if path.suffix == ".onnx":
        if not path.is_file():
            raise UsageError(f"ONNX model {spec} does not exist; check the path")
        return path
    if path.is_dir() and (path / ONNX_NAME).is_file() and not list(path.glob("*.safetensors")):
        return path / ONNX_NAME
    return None


def _open(spec: str):
    """(model-like, tokenizer, description) for any model tapc can evaluate."""
    from transformers import AutoConfig, AutoTokenizer

    from .models import load_model

    onnx = _onnx_path(spec)
    if onnx is None:
        loaded = load_model(spec)
        return loaded.model, loaded.tokenizer, loaded.source
    folder = onnx.parent
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder} has no config.json and tokenizer next to {onnx.name}; export with `tapc export`")
    config = AutoConfig.from_pretrained(folder)
    model = OnnxCausalLM(onnx, config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer, {"spec": spec, "kind": "onnx", "path": str(onnx.resolve()), "bytes": onnx_bytes(onnx)}


def evaluate_model(spec: str, dataset: str = "wikitext2", *, seq_len: int | None = None, stride: int | None = None,
                   max_tokens: int | None = None, batch_size: int = 4, progress=None) -> dict:
    """Perplexity of any saved model on the test split of `dataset` (SPEC protocol)."""
    from .models import model_context

    notify = progress or (lambda event: None)
    notify({"stage": "load", "model": spec})
    model, tokenizer, source = _open(spec)
    context = model_context(model)
    seq_len = seq_len or min(context or 1024, 1024)
    if context and seq_len > context:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's context of {context} tokens; use at most {context}")
    if stride and stride > seq_len:
        raise UsageError(f"--stride {stride} exceeds the window of {seq_len}; use a stride <= the window")
    notify({"stage": "data", "dataset": dataset})
    texts = load_texts(dataset)
    tokens = tokenize(tokenizer, texts.texts["test"])
    if tokens.numel() < 2:
        raise UsageError("the test text has fewer than 2 tokens; give more text in test.txt")
    result = perplexity(model, tokens, seq_len, stride=stride, max_tokens=max_tokens, batch_size=batch_size,
                        progress=lambda e: notify({**e, "stage": "eval"}))
    return {"model": source, "dataset": texts.source, "perplexity": result.to_dict()}


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], str, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if is_sparse(path):
        return load_sparse(path), "sparse", _metadata(path / SPARSE_FILE)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{path} holds no *.safetensors weights; give a model directory written by tapc or save_pretrained")
    tensors, meta = {}, {}
    for file in files:
        tensors.update(load_file(str(file)))
        with safe_open(str(file), framework="pt") as fh:
            meta.update(fh.metadata() or {})
    return tensors, "safetensors", meta


def _metadata(file: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        return dict(fh.metadata() or {})


def _projections(folder: Path) -> dict[str, int]:
    """{weight name: input dim} of the projections, from the architecture alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import prunable_weights

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{folder} has no readable config.json ({str(exc).splitlines()[0][:120]}); give a model directory") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {f"{name}.weight": input_dim(module) for name, module in prunable_weights(model).items()}


def inspect_checkpoint(spec: str, pattern: str | None = None) -> dict:
    """Per-layer sparsity counted from the files, and whether an N:M pattern holds.

    `pattern` is checked if given; otherwise the pattern the run recorded (if any).
    """
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise UsageError(f"{spec} is not a model directory; give OUT/model or OUT/sparse of a tapc run")
    tensors, kind, meta = _read_tensors(path)
    dims = _projections(path)
    missing = [name for name in dims if name not in tensors]
    if missing:
        raise UsageError(f"{spec} lacks the weight {missing[0]} that its config.json implies; is the folder complete?")
    names = list(dims)
    report = {"path": str(path), "format": kind, "sparsity": sparsity_summary(tensors, names),
              "bytes": sum(p.stat().st_size for p in path.glob("*.safetensors"))}
    claimed = None
    if meta.get("tapc.recipe"):
        claimed = json.loads(meta["tapc.recipe"]).get("prune", {}).get("pattern")
    chosen = pattern or claimed
    if chosen:
        try:
            parsed: Pattern = parse_pattern(chosen)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if parsed.structured:
            per_layer = {n: violations(tensors[n], dims[n], parsed) for n in names}
            bad = sum(v[0] for v in per_layer.values())
            report["pattern"] = {
                "pattern": str(parsed), "source": "--pattern" if pattern else "recorded by the run",
                "violating_groups": bad, "groups": sum(v[1] for v in per_layer.values()), "holds": bad == 0,
                "violating_layers": [n for n, v in per_layer.items() if v[0]],
            }
    return report
