"""compress(): the whole job, stage by stage, as SPEC.md lists it."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .data import load_texts, tokenize, windows
from .errors import UsageError
from .evaluate import Perplexity, mean_loss, perplexity
from .export import check_output_dir, save_model, staged_output, write_json
from .models import load_model, model_context
from .pruner import Pruner
from .recipe import Recipe, load_recipe, recipe_to_yaml
from .report import format_table, model_tensors, sparsity_summary
from .saliency import NEEDS_ACTIVATIONS
from .train import build_optimizer, total_steps, train


CALIBRATION_WINDOWS = 32  # training windows whose activations wanda's scores weigh by


@dataclass
class Result:
    report: dict
    output: Path

    @property
    def table(self) -> str:
        return format_table(self.report)


def default_output(model: str, recipe: Recipe) -> Path:
    stem = Path(model.rstrip("/")).name.removesuffix(".gguf") or "model"
    return Path(f"{stem}-tapc-s{round(recipe.prune.sparsity * 100)}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name} requested but no CUDA GPU is available; use --device cpu")
    return device


def _seq_lens(recipe: Recipe, model) -> tuple[int, int]:
    context = model_context(model)
    seq_len = recipe.data.seq_len or min(context or 1024, 1024)
    eval_len = recipe.eval.seq_len or seq_len
    for name, value in (("--seq-len", seq_len), ("eval.seq_len", eval_len)):
        if context and value > context:
            raise UsageError(f"{name} {value} exceeds the model's context of {context} tokens; use at most {context}")
    if recipe.eval.stride and recipe.eval.stride > eval_len:
        raise UsageError(f"eval.stride {recipe.eval.stride} exceeds the window of {eval_len}; use a stride <= the window")
    return seq_len, eval_len


def compress(
    model: str,
    recipe: Recipe | None = None,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress=None,
) -> Result:
    """Load, evaluate, prune while training, evaluate again, report and save `model`."""
    recipe = recipe or load_recipe()
    out = Path(out) if out else default_output(model, recipe)
    check_output_dir(out, overwrite)
    notify = progress or (lambda event: None)
    started = time.perf_counter()
    device = resolve_device(recipe.device)

    notify({"stage": "load", "model": model})
    loaded = load_model(model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    net, tokenizer = loaded.model.to(device), loaded.tokenizer
    seq_len, eval_len = _seq_lens(recipe, net)

    notify({"stage": "data", "dataset": recipe.data.dataset})
    dataset = load_texts(recipe.data.dataset)
    tokens = {split: tokenize(tokenizer, text) for split, text in dataset.texts.items()}
    train_windows, val_windows = windows(tokens["train"], seq_len), windows(tokens["validation"], seq_len)
    if len(train_windows) == 0:
        raise UsageError(
            f"the training text has {tokens['train'].numel()} tokens, less than one window of {seq_len}; "
            "give more text or a smaller --seq-len"
        )
    if tokens["test"].numel() < 2:
        raise UsageError("the test text has fewer than 2 tokens; give more text in test.txt")

    def evaluate(stage: str) -> Perplexity:
        notify({"stage": stage})
        return perplexity(
            net, tokens["test"], eval_len, stride=recipe.eval.stride, max_tokens=recipe.eval.max_tokens,
            batch_size=recipe.eval.batch_size, device=device, progress=lambda e: notify({**e, "stage": stage}),
        )

    dense = evaluate("eval-dense")
    val = val_windows[: recipe.train.val_batches * recipe.train.batch_size]
    dense_val_loss = mean_loss(net, val, recipe.train.batch_size, device) if len(val) else dense.nll

    torch.manual_seed(recipe.seed)
    steps = total_steps(recipe, len(train_windows))
    pruner = Pruner(recipe.prune, steps).prepare(net)
    if recipe.prune.saliency in NEEDS_ACTIVATIONS:
        pruner.calibrate(net, train_windows[:CALIBRATION_WINDOWS], recipe.train.batch_size, device)
    optimizer = build_optimizer(net, recipe, pruner, ref_loss=dense_val_loss)
    log = train(net, pruner, optimizer, train_windows, val_windows, recipe, steps, device, progress=notify)
    log.validation.insert(0, {"step": 0, "loss": dense_val_loss})
    pruned_names = [f"{name}.weight" for name in pruner.modules]
    pruner.finalize()
    pruned = evaluate("eval-pruned")

    notify({"stage": "save", "output": str(out)})
    sparsity = sparsity_summary(model_tensors(net), pruned_names)
    report = {
        "tool": "tapc",
        "version": __version__,
        "model": loaded.source,
        "dataset": {"source": dataset.source, "notes": dataset.notes,
                    "tokens": {split: t.numel() for split, t in tokens.items()}},
        "recipe": recipe.model_dump(mode="json"),
        "device": str(device),
        "platform": {"python": platform.python_version(), "torch": torch.__version__},
        "seq_len": seq_len,
        "perplexity": {"dense": dense.to_dict(), "pruned": pruned.to_dict(),
                       "increase": pruned.ppl / dense.ppl - 1.0},
        "sparsity": sparsity,
        "train": {"steps": steps, "tokens": log.tokens, "seconds": log.seconds,
                  "mask_updates": len(log.mask_updates),
                  "ta": "off" if not recipe.ta.enabled else f"target={recipe.ta.target}, space={recipe.ta.space}"},
        "output": str(out),
    }
    with staged_output(out, overwrite) as stage:
        metadata = {
            "tapc.version": __version__,
            "tapc.sparsity": f"{sparsity['prunable_sparsity']:.6f}",
            "tapc.pruned_tensors": json.dumps(pruned_names),
            "tapc.recipe": json.dumps(report["recipe"]),
        }
        save_model(net, tokenizer, stage / "model", metadata)
        (stage / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        write_json(stage / "training_log.json", log.to_dict())
        report["seconds"] = time.perf_counter() - started
        write_json(stage / "report.json", report)
    return Result(report=report, output=out)
