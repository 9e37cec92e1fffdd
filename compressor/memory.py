"""The memory bill of a run, before the model is loaded.

`estimate(spec, recipe)` reads only the model's config, builds the model on PyTorch's
meta device (no memory) to count its parameters and prunable weights, and adds up what
one process holds at the peak of a training step:

    per parameter    fp32 weight 4, gradient 4, AdamW moments 8           = 16 bytes
                     + the teacher's fp32 copy 4 (train.loss kd or ce+kd)
    per prunable     Taylor score 4, mask 1, the masked weight w * mask   = 9 bytes
    weight           the forward pass builds and keeps for backward 4
    activations      batch x seq_len x layers x (10 hidden + 4 intermediate) floats kept
                     for backward (a decoder layer: norms, q/k/v, attention output,
                     residuals, the MLP's gate/up/activation/product), 4 bytes each
    logits           batch x seq_len x vocabulary x 4 bytes, 4 copies for cross-entropy
                     (logits, log-softmax, their gradients), 6 more with a teacher
    runtime          Python, torch and transformers themselves, 0.6 GB

and the peak of the evaluation after training: the pruned and the dense model's weights
(the drift's reference), the gradients still held, the pruner's state, eval batch x
window x vocabulary x 4 bytes in 8 copies (both models' logits and log-softmax, the
KL's temporaries), and the training step's activations again: on CPU they are many
small blocks that the allocator keeps after training. Measured on SmolLM2-135M
(benchmarks/memory.py, README) the estimate is within 25% of the peak resident memory.
Calibration, before training and only when a run has it (a one-shot method or first mask,
global-wanda saliency), is a third peak: the model and the teacher's copy, and either one
forward's logits on eval batch x prune.calibration_len tokens (global-wanda: the whole model
runs) or, one layer at a time (one-shot), two copies of the calibration windows' hidden
states and, for SparseGPT, that layer's Hessians (in^2 floats per projection, the largest
once more in float64 while it is pruned). It stays below the training step's unless the
calibration windows are far longer or more than the training ones.
Exports (ONNX, GGUF) run after training, one model at a time, and are not included.
The checkpoint, when written, clones the scores and masks (+5 bytes per prunable weight).

Several processes: ddp gives each its share of the batch (activations, logits) and a
whole copy of everything else. fsdp (`train.parallel: fsdp`) divides every per-parameter
part by the number of processes and adds the blocks FSDP holds whole while they run:
two blocks' fp32 weights (the running one and the next, prefetched) and one block's
unreduced gradient; its evaluation runs on rank 0 alone, after gathering the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UsageError
from .recipe import Recipe

GB = 1024**3
RUNTIME = int(0.6 * GB)


@dataclass
class Estimate:
    params: int
    prunable: int
    train: dict[str, int] = field(default_factory=dict)  # bytes by part, at the peak of a training step
    eval: dict[str, int] = field(default_factory=dict)  # bytes by part, at the peak of an evaluation pass
    calibration: dict[str, int] = field(default_factory=dict)  # bytes by part, calibrating (empty: none)
    device: str = "cpu"
    available: int | None = None  # bytes free on the device (RAM for CPU runs), when known
    split: str | None = None  # why the batch runs as micro-batches, when it does

    @property
    def peak(self) -> int:
        return max(sum(self.train.values()), sum(self.eval.values()), sum(self.calibration.values()))

    @property
    def state_bytes_per_param(self) -> float:
        """Bytes per parameter of the training state: weights, gradients, moments, scores, masks, teacher."""
        keys = ("weights", "gradients", "adam", "scores_masks", "teacher")
        return sum(self.train.get(k, 0) for k in keys) / self.params

    def to_dict(self) -> dict:
        return {"params": self.params, "prunable": self.prunable, "train": self.train, "eval": self.eval,
                "calibration": self.calibration, "peak_bytes": self.peak,
                "state_bytes_per_param": self.state_bytes_per_param, "device": self.device,
                "available_bytes": self.available, "split": self.split}

    def line(self) -> str:
        parts = ", ".join(f"{k.replace('_', ' ')} {v / GB:.2f}" for k, v in self.train.items() if v)
        free = f"; {self.available / GB:.1f} GB available on {self.device}" if self.available else ""
        return (f"memory estimate: {self.peak / GB:.1f} GB per process at the peak (training step, GB: {parts}; "
                f"{self.state_bytes_per_param:.1f} bytes of training state per parameter){free}")


def meta_model(spec: str, trust_remote_code: bool = False):
    """The model built from its config on the meta device: shapes without memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        location, kwargs = str(path.parent), {"gguf_file": path.name}
    else:
        location, kwargs = spec, {}
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code, **kwargs)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # the loader that follows says what is wrong with the model, in its own words
        return None


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device`: the GPU's free memory, or the machine's available RAM, or less where this
    process's cgroup (a container, a CI job's limit) allows less."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        free = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    room = cgroup_room()
    return free if room is None else min(free, room)


def cgroup_room(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes this process's memory cgroup still allows (its limit less its usage), None without a limit."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            limit, usage = root / path.lstrip("/") / "memory.max", root / path.lstrip("/") / "memory.current"
        elif "memory" in controllers.split(","):  # cgroup v1
            folder = root / "memory" / path.lstrip("/")
            limit, usage = folder / "memory.limit_in_bytes", folder / "memory.usage_in_bytes"
        else:
            continue
        try:
            text = limit.read_text().strip()
            if text == "max" or int(text) >= 2**60:  # no limit
                continue
            return max(0, int(text) - int(usage.read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def estimate_for(model, recipe: Recipe, world: int = 1, seq_len: int | None = None,
                 eval_len: int | None = None) -> Estimate:
    """The estimate for a model (real or on the meta device) under `recipe` with `world` processes."""
    from .models import prunable_weights, window_length

    params = sum(p.numel() for p in model.parameters())
    prunable = sum(m.weight.numel() for m in prunable_weights(model).values())
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    vocab = config.vocab_size
    seq_len = seq_len or recipe.data.seq_len or window_length(model)
    eval_len = eval_len or recipe.eval.seq_len or seq_len
    tokens = micro_batch(recipe, world) * seq_len
    teacher = recipe.train.loss != "ce"
    shards = world if recipe.train.parallel == "fsdp" and world > 1 else 1
    block = prunable // layers  # a decoder block's projection weights, the bulk of it
    train = {
        "weights": 4 * params // shards,
        "gradients": 4 * params // shards,
        "adam": 8 * params // shards,
        "scores_masks": 5 * prunable // shards,
        "teacher": 4 * params // shards if teacher else 0,
        "masked_weights": 4 * prunable // shards,
        "gathered_blocks": (3 + 2 * teacher) * 4 * block if shards > 1 else 0,
        "activations": 4 * tokens * layers * (10 * hidden + 4 * inter),
        "logits": 4 * tokens * vocab * (10 if teacher else 4),
        "checkpoint": 5 * prunable // shards if recipe.train.checkpoint_every else 0,
        "runtime": RUNTIME,
    }
    eval_tokens = recipe.eval.batch_size * eval_len
    evaluation = {"weights": 8 * params, "gradients": 4 * params, "scores_masks": 5 * prunable,
                  "logits": 4 * eval_tokens * vocab * 8, "activations": train["activations"], "runtime": RUNTIME}
    return Estimate(params=params, prunable=prunable, train=train, eval=evaluation,
                    calibration=_calibration(model, recipe, params, hidden, vocab, layers, seq_len, teacher))


def _calibration(model, recipe: Recipe, params: int, hidden: int, vocab: int, layers: int, seq_len: int,
                 teacher: bool) -> dict[str, int]:
    """Bytes by part at the peak of calibration; empty for a run that does not calibrate."""
    from .models import prunable_weights
    from .oneshot import METHODS
    from .patterns import input_dim
    from .saliency import NEEDS_ACTIVATIONS

    prune = recipe.prune
    oneshot = (prune.method if prune.method != "dynamic" else prune.start) in METHODS
    if not oneshot and prune.saliency not in NEEDS_ACTIVATIONS:
        return {}
    length = prune.calibration_len or seq_len
    parts = {"weights": 4 * params, "teacher": 4 * params if teacher else 0, "runtime": RUNTIME}
    if prune.saliency in NEEDS_ACTIVATIONS:
        parts["logits"] = 4 * recipe.eval.batch_size * length * vocab
    if oneshot:
        parts["hidden_states"] = 2 * 4 * prune.calibration_windows * length * hidden
        if "sparsegpt" in (prune.method, prune.start):
            inputs = [m.weight.shape[input_dim(m)] for m in prunable_weights(model).values()]
            parts["hessians"] = 4 * sum(i * i for i in inputs) // layers + 8 * max(inputs) ** 2
    return parts


def micro_batch(recipe: Recipe, world: int = 1) -> int:
    """Windows one process runs forward and backward at a time."""
    return recipe.train.micro_batch or max(1, recipe.train.batch_size // world)


def check_fits(spec: str, recipe: Recipe, device: torch.device, world: int = 1, *, trust_remote_code: bool = False,
               notify=None) -> Estimate | None:
    """Estimate before loading. A batch that does not fit is split into micro-batches (setting
    `recipe.train.micro_batch`, the largest that fits); a run that clearly cannot fit even one
    window at a time (the estimate 25% above what the device has free) stops with a one-line
    error. None when the config cannot be read here."""
    model = meta_model(spec, trust_remote_code)
    if model is None:
        return None
    est = estimate_for(model, recipe, world)
    est.device, est.available = str(device), available_bytes(device)
    split = None
    if est.available and est.peak > est.available and recipe.train.micro_batch is None:
        split = _fitting_micro_batch(model, recipe, world, est.available)
    if split:
        whole = micro_batch(recipe, world)
        recipe.train.micro_batch = split
        est = estimate_for(model, recipe, world)
        est.device, est.available = str(device), available_bytes(device)
        est.split = (f"a batch of {whole} windows per process needs more than the {est.available / GB:.1f} GB "
                     f"free: it runs as {whole // split} micro-batches of {split} (the same step; "
                     "train.micro_batch)")
    if notify:
        notify({"stage": "memory", "estimate": est.to_dict(), "line": est.line()})
        if split:
            notify({"stage": "memory", "line": est.split})
    if est.available and est.peak > 1.25 * est.available and not os.environ.get("TAPC_IGNORE_MEMORY"):
        hints = ["a shorter --seq-len"] + (["train.micro_batch: 1"] if micro_batch(recipe, world) > 1 else [])
        if recipe.train.loss != "ce":
            hints.append("--loss ce (no teacher copy)")
        if world > 1 and recipe.train.parallel != "fsdp":
            hints.insert(0, "--parallel fsdp (shards the training state over the processes)")
        raise UsageError(f"this run needs about {est.peak / GB:.1f} GB per process but {device} has "
                         f"{est.available / GB:.1f} GB free; try {', '.join(hints)}, or a machine with more memory "
                         "(TAPC_IGNORE_MEMORY=1 runs it anyway)")
    return est


def _fitting_micro_batch(model, recipe: Recipe, world: int, available: int) -> int | None:
    """The largest divisor of the per-process batch whose estimate fits in `available`, if a smaller one does."""
    whole = micro_batch(recipe, world)
    for size in sorted((d for d in range(1, whole) if whole % d == 0), reverse=True):
        trial = recipe.model_copy(update={"train": recipe.train.model_copy(update={"micro_batch": size})})
        if estimate_for(model, trial, world).peak <= available:
            return size
    return 1 if whole > 1 else None  # the smallest there is; the check that follows says if even that is too much


def peak_rss() -> int | None:
    """This process's peak resident memory so far, in bytes (Linux/macOS)."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except (ImportError, OSError):
        return None
