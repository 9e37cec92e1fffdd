"""compress(): the whole job, stage by stage (docs/method.md, The pipeline), and its quality gates."""

from __future__ import annotations

import copy
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import __version__, checkpoint, sharding, structure
from . import distributed as dist
from .export import export_artifacts, export_error, export_lines
from .data import load_texts, tokenize, windows
from .distill import chat_stream, instruction_prompts, mix_windows, teacher_copy, uses_teacher
from .errors import ExportError, JobError, UsageError
from .evaluate import Evaluation, Perplexity, mean_loss, perplexity
from .folder import check_output_dir, directory_bytes, save_model, staged_output, write_json
from .export.gguf import gguf_architecture, source_metadata
from .markdown import render_markdown
from .memory import check_fits, peak_rss
from .models import load_model, prunable_weights, window_length
from .plots import write_plots
from .calibration import recipe_calibration
from .pruner import build_pruner
from .recipe import Recipe, default_recipe, load_recipe, recipe_to_yaml
from .report import format_table, model_tensors, sparsity_summary
from .train import Interrupted, Trainer, build_optimizer, run, total_steps

SCHEMA_VERSION = 1  # of report.json and --json; bump on incompatible changes


@dataclass
class Result:
    report: dict
    output: Path

    @property
    def table(self) -> str:
        return "\n".join([format_table(self.report), *export_lines(self.report.get("export", {}))])


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
    seq_len = window_length(model, recipe.data.seq_len)
    eval_len = window_length(model, recipe.eval.seq_len or seq_len, "eval.seq_len")
    if recipe.prune.calibration_len:
        window_length(model, recipe.prune.calibration_len, "prune.calibration_len")
    if recipe.eval.stride and recipe.eval.stride > eval_len:
        raise UsageError(f"eval.stride {recipe.eval.stride} exceeds the window of {eval_len}; use a stride <= the window")
    return seq_len, eval_len


@dataclass
class Gates:
    """Quality limits for CI jobs: the run fails (exit 3) when the pruned model misses one."""

    max_ppl_increase: float | None = None  # percent over the dense perplexity
    max_ppl: float | None = None


def check_gates(dense_ppl: float, pruned_ppl: float, gates: Gates | None) -> dict:
    gates = gates or Gates()
    failures = []
    increase = (pruned_ppl / dense_ppl - 1.0) * 100
    if gates.max_ppl_increase is not None and increase > gates.max_ppl_increase:
        failures.append(f"pruned perplexity {pruned_ppl:.3f} is {increase:.2f}% above dense {dense_ppl:.3f} "
                        f"(limit {gates.max_ppl_increase:g}%)")
    if gates.max_ppl is not None and pruned_ppl > gates.max_ppl:
        failures.append(f"pruned perplexity {pruned_ppl:.3f} is above the limit {gates.max_ppl:g}")
    return {**asdict(gates), "passed": not failures, "failures": failures}


@dist.ends_process_group
def compress(model: str, recipe: Recipe | None = None, out: str | Path | None = None, *, overwrite: bool = False,
             resume: bool = False, gates: Gates | None = None, trust_remote_code: bool = False,
             allow_pickle: bool = False, progress=None, stop=None, dry_run: bool = False,
             recipe_choice: str | None = None) -> Result:
    """Load, evaluate, prune while training, evaluate again, report and save `model`.

    `resume` continues from the checkpoint beside `out`; `stop()` (polled once per step)
    asks for a clean stop with a checkpoint, as the CLI does on SIGINT/SIGTERM.
    Under a distributed launcher every process calls this; rank 0 writes the outputs.
    Before loading, the memory a process will need is estimated (`compressor.memory`);
    a run that clearly cannot fit stops there. `dry_run` stops after a few timed
    training steps and returns the plan (`Result.report`) without writing anything.
    Without a `recipe`, the default for the device (`default_recipe`) runs; `recipe_choice`
    (or that choice) says in the report which recipe ran and why.
    """
    recipe, recipe_choice = _chosen_recipe(recipe, recipe_choice)
    out = Path(out) if out else default_output(model, recipe)
    ckpt_dir, saved = _open_output(out, overwrite, resume)
    started = time.perf_counter()
    device, notify = _start_processes(recipe, progress)
    estimate = check_fits(model, recipe, device, dist.world_size(), trust_remote_code=trust_remote_code,
                          notify=notify)
    load = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
    loaded, net, data, (seq_len, eval_len) = _load(model, recipe, device, load, notify)
    fingerprint = _fingerprint(loaded, data, recipe, saved, ckpt_dir)
    evaluate = _evaluator(data["test"], eval_len, recipe, device, notify)
    val = data["val"][: recipe.train.val_batches * recipe.train.batch_size]
    if dry_run:
        return Result(report=_dry_run(net, recipe, data, device, val, estimate, notify, eval_len,
                                      time.perf_counter() - started), output=out)
    dense, dense_val_loss = _dense_baseline(net, saved, evaluate, val, recipe, device)
    extra = {"fingerprint": fingerprint, "dense": {"ppl": asdict(dense), "val_loss": dense_val_loss}}
    # The dense model, taken before pruning (a resumed run reloaded it above): the teacher of
    # a distillation loss, and the reference every output's drift is measured against.
    teacher = teacher_copy(net) if uses_teacher(recipe.train) else None
    steps, pruner, log = _recover(net, recipe, data, device, dense_val_loss, ckpt_dir, extra, saved, notify, stop,
                                  teacher)
    log.validation.insert(0, {"step": 0, "loss": dense_val_loss})
    training = {"peak_rss": peak_rss(), "pruned": [f"{name}.weight" for name in pruner.modules],
                "parallel": "fsdp" if pruner.sharded else "ddp" if dist.world_size() > 1 else None}
    net, teacher = _trained_model(net, pruner, teacher, lambda: _reload_dense(model, device, load, notify), training)
    if not dist.is_main():
        dist.barrier()
        return Result(report={}, output=out)
    teacher = teacher if teacher is not None else _reload_dense(model, device, load, notify)  # ce runs kept none
    pruned_top1: list = []  # the fp32 model's predictions, for the quantized models' top-1 agreement
    pruned = evaluate("eval-pruned", net, pruned_top1, teacher)
    evaluation = Evaluation(lambda m, top1: evaluate("eval-quantized", m, top1, teacher), pruned, pruned_top1)
    notify({"stage": "save", "output": str(out)})
    report = _build_report(loaded, data, recipe, recipe_choice, device, seq_len, dense, pruned, net, steps, log,
                           saved, training, gates, estimate, out)
    with staged_output(out, overwrite or resume) as stage:
        _write_outputs(stage, net, loaded.tokenizer, recipe, report, log, training["pruned"], evaluation,
                       data["train"][: recipe.export.calibration_windows], notify, started)
    checkpoint.remove(ckpt_dir)
    dist.barrier()
    if export_error(report["export"]):
        raise ExportError(f"{export_error(report['export'])}; everything else is in {out}", Result(report, out))
    return Result(report=report, output=out)


def _chosen_recipe(recipe: Recipe | None, choice: str | None) -> tuple[Recipe, str | None]:
    """The recipe to run (the device's default without one), as a copy: the memory check may split the
    batch, and the caller's stays as given."""
    if recipe is None:
        name, why = default_recipe()
        recipe, choice = load_recipe(name), f"{name}: {why}"
    return recipe.model_copy(deep=True), choice


def _open_output(out: Path, overwrite: bool, resume: bool) -> tuple[Path, dict | None]:
    """The checkpoint directory beside `out`, and the checkpoint to resume from (None for a fresh run)."""
    ckpt_dir = checkpoint.checkpoint_dir(out)
    check_output_dir(out, overwrite or resume)
    if ckpt_dir.exists() and not (resume or overwrite):
        raise UsageError(f"{ckpt_dir} holds a checkpoint of an interrupted run; pass --resume to continue it "
                         "or --overwrite to start over")
    return ckpt_dir, checkpoint.load(ckpt_dir) if resume else None


def _start_processes(recipe: Recipe, progress):
    """The device of this process (one GPU per process when distributed) and its progress callback
    (rank 0 reports, the others stay quiet)."""
    device = resolve_device(recipe.device)
    dist.init_from_env(device)
    notify = progress if progress and dist.is_main() else (lambda event: None)  # the rank is known from here
    if device.type == "cuda" and dist.world_size() > 1:
        device = torch.device("cuda", dist.local_rank())
        torch.cuda.set_device(device)
    return device, notify


def _load(model: str, recipe: Recipe, device, load: dict, notify):
    """The model on `device`, the tokenized data (with self-distillation mixed in, and the calibration windows
    drawn) and the window lengths."""
    notify({"stage": "load", "model": model})
    loaded = load_model(model, **load)
    net = loaded.model.to(device)
    if recipe.export.gguf:
        gguf_architecture(net)  # an unsupported model for export.gguf fails now, not after training
    if recipe.prune.structure:  # units the architecture cannot drop fail now, not after the dense evaluation
        structure.find_groups(net, tuple(recipe.prune.structure), prunable_weights(net))
    seq_lens = _seq_lens(recipe, net)
    notify({"stage": "data", "dataset": recipe.data.dataset})
    data = _prepare_data(recipe, loaded.tokenizer, seq_lens[0])
    if recipe.data.self_distill:
        notify({"stage": "self-distill", "prompts": recipe.data.self_distill})
        _add_self_distillation(net, loaded.tokenizer, recipe, data, seq_lens[0])
    data["calibration"] = recipe_calibration(data["train"], recipe, data.pop("train_text"))
    return loaded, net, data, seq_lens


def _fingerprint(loaded, data: dict, recipe: Recipe, saved: dict | None, ckpt_dir: Path) -> dict:
    """What a checkpoint must match to be resumed (the model, the data's size and the recipe), checked
    against the one being resumed."""
    fingerprint = {"model": {k: loaded.source.get(k) for k in ("kind", "id", "revision", "sha256")},
                   "data": data["tokens_per_split"],
                   # micro-batches change the order of sums, not the run: a resume may split differently
                   "recipe": recipe.model_dump(mode="json", exclude={"device": True, "train": {"micro_batch"}})}
    if saved:
        checkpoint.verify(saved, fingerprint, ckpt_dir)
    return fingerprint


def _evaluator(test: torch.Tensor, eval_len: int, recipe: Recipe, device, notify):
    """`evaluate(stage, model, top1=None, reference=None)`: perplexity on the test stream by the recipe's protocol."""
    def evaluate(stage: str, model, top1: list | None = None, reference=None) -> Perplexity:
        notify({"stage": stage})
        return perplexity(model, test, eval_len, stride=recipe.eval.stride, max_tokens=recipe.eval.max_tokens,
                          batch_size=recipe.eval.batch_size, device=device,
                          progress=lambda e: notify({**e, "stage": stage}), top1=top1, reference=reference)
    return evaluate


def _dense_baseline(net, saved: dict | None, evaluate, val: torch.Tensor, recipe: Recipe, device):
    """The dense model's perplexity and validation loss; a resumed run's model is no longer dense, so
    it takes what was measured then."""
    if saved:
        return Perplexity(**saved["dense"]["ppl"]), saved["dense"]["val_loss"]
    dense = dist.broadcast(evaluate("eval-dense", net) if dist.is_main() else None)
    return dense, mean_loss(net, val, recipe.train.batch_size, device) if len(val) else dense.nll


def _trained_model(net, pruner, teacher, reload_dense, training: dict):
    """The trained model with its masks baked in (sharded: gathered whole on rank 0, beside a dense
    teacher reloaded there; structured: the masked units cut out, `training` told the sparsity they
    made and what was cut) and the teacher. Non-finite weights stop every process."""
    finite = all(torch.isfinite(dist.local(p)).all() for p in net.parameters() if p.is_floating_point())
    if dist.any_rank(not finite):  # every process stops here, none waits for the others
        raise JobError("the trained model has non-finite weights and was not saved; lower optim.lr or ta.lr")
    if pruner.sharded:  # every process sends its rows; rank 0 gets the whole model, plain, masks baked in
        pruner.scores.clear()
        teacher = reload_dense() if dist.is_main() else None  # the training teacher was sharded too
        return sharding.gather(net, lambda: copy.deepcopy(teacher)), teacher
    masks = {name: mask.clone() for name, mask in pruner.masks.items()} if pruner.groups else None
    pruner.finalize()
    if pruner.groups:  # the zeros counted against the dense shapes, then the smaller model
        training["sparsity"] = sparsity_summary(model_tensors(net), training["pruned"])
        smaller = structure.cut(net, pruner.groups, masks, pruner.modules)
        training["structure"] = structure.summary(pruner.groups, masks, pruner.modules, net, smaller)
        net = smaller
    return net, teacher


def _reload_dense(model: str, device, load: dict, notify):
    """The dense model again, frozen: the reference of the pruned model's drift."""
    notify({"stage": "load", "model": model})
    return teacher_copy(load_model(model, **load).model.to(device))


def _build_report(loaded, data: dict, recipe: Recipe, recipe_choice: str | None, device, seq_len: int,
                  dense: Perplexity, pruned: Perplexity, net, steps: int, log, saved: dict | None, training: dict,
                  gates: Gates | None, estimate, out: Path) -> dict:
    """report.json's fields known once the pruned model is evaluated; the exports add theirs."""
    oneshot = next(({"method": u["method"], "seconds": u["seconds"],
                     "calibration_windows": recipe.prune.calibration_windows}
                    for u in log.mask_updates if u.get("method")), None)
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "tapc",
        "version": __version__,
        "model": loaded.source,
        "dataset": {"source": data["source"], "notes": data["notes"], "tokens": data["tokens_per_split"]},
        "recipe": recipe.model_dump(mode="json"),
        "recipe_choice": recipe_choice,
        "device": str(device),
        "processes": dist.world_size(),
        "parallel": training["parallel"],
        "platform": {"python": platform.python_version(), "torch": torch.__version__},
        "seq_len": seq_len,
        "perplexity": {"dense": dense.to_dict(), "pruned": pruned.to_dict(),
                       "increase": pruned.ppl / dense.ppl - 1.0},
        "sparsity": training.get("sparsity") or sparsity_summary(model_tensors(net), training["pruned"]),
        **({"structure": training["structure"]} if "structure" in training else {}),
        "train": {"steps": steps, "tokens": log.tokens, "seconds": log.seconds, "state_bytes": log.state_bytes,
                  "peak_rss_after_training": training["peak_rss"],
                  "peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                  "mask_updates": len(log.mask_updates), "recoveries": log.recoveries,
                  "resumed_from": saved["step"] if saved else None, "oneshot": oneshot,
                  "ta": "off" if not recipe.ta.enabled else f"target={recipe.ta.target}, space={recipe.ta.space}"},
        "gates": check_gates(dense.ppl, pruned.ppl, gates),
        "memory_estimate": estimate.to_dict() if estimate else None,
        "output": str(out),
    }


def _write_outputs(stage: Path, net, tokenizer, recipe: Recipe, report: dict, log, pruned_names: list[str],
                   evaluation: Evaluation, calibration: torch.Tensor, notify, started: float) -> None:
    """Everything a run leaves, into the staging directory; fills in the report's last fields."""
    sparsity = report["sparsity"]
    metadata = {
        "tapc.version": __version__,
        "tapc.sparsity": f"{sparsity['prunable_sparsity']:.6f}",
        "tapc.pruned_tensors": json.dumps(pruned_names),
        "tapc.recipe": json.dumps(report["recipe"]),
        **source_metadata(report["model"]),  # a .gguf source: its metadata and tokenizer go into OUT/gguf/
    }
    save_model(net, tokenizer, stage / "model", metadata)
    # A cut model has no zeros left: its sparse artifact would only add a bitmask to the same values.
    exports = recipe.export.model_copy(update={"sparse": False}) if "structure" in report else recipe.export
    report["export"] = export_artifacts(net, tokenizer, stage / "model", stage, exports, pruned_names,
                                        evaluation=evaluation, calibration=calibration, progress=notify)
    (stage / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    write_json(stage / "training_log.json", log.to_dict())
    report["size"] = {"model_bytes": directory_bytes(stage / "model")}
    # Plots are drawn here, from the log, never during training; without matplotlib they are skipped.
    plots, skipped = write_plots(stage, report, log.to_dict())
    for line in skipped:
        notify({"stage": "save", "warning": line})
    report["files"] = {"report": "report.md", "plots": plots, "plots_skipped": skipped}
    report["seconds"] = time.perf_counter() - started
    (stage / "report.md").write_text(render_markdown(report, log.to_dict(), plots, skipped), encoding="utf-8")
    write_json(stage / "report.json", report)


def _recover(net, recipe: Recipe, data: dict, device, dense_val_loss: float, ckpt_dir: Path, extra: dict,
             saved: dict | None, notify, stop, teacher):
    """Prune while training, with checkpoints, roll-backs and resume; returns (steps, pruner, log)."""
    trainer = _build_trainer(net, recipe, data, device, dense_val_loss, teacher, not saved, notify)
    steps, pruner = trainer.steps, trainer.pruner

    def save_checkpoint(t: Trainer) -> None:
        if t.sharded:  # every process its shard first; then checkpoint.pt, which names them
            checkpoint.save_shard(ckpt_dir, t.step, t.state_dict())
            dist.barrier()
        if dist.is_main():
            checkpoint.save(ckpt_dir, {"step": t.step, "shards": dist.world_size(), **extra} if t.sharded
                            else {**t.state_dict(), **extra})
        dist.barrier()
        if t.sharded:
            checkpoint.drop_old_shards(ckpt_dir, t.step)

    def restore(t: Trainer) -> None:
        t.load_state_dict(checkpoint.trainer_state(ckpt_dir, checkpoint.load(ckpt_dir)))

    if saved:
        trainer.load_state_dict(checkpoint.trainer_state(ckpt_dir, saved))
        notify({"stage": "train", "resumed": saved["step"]})
    elif recipe.train.checkpoint_every and steps:
        save_checkpoint(trainer)  # step 0: something to roll back to if the loss blows up early
    try:
        log = run(trainer, progress=notify, checkpoint=save_checkpoint,
                  restore=restore if recipe.train.checkpoint_every else None, stop=stop)
    except Interrupted as exc:
        raise Interrupted(exc.step, f"checkpoint in {ckpt_dir}; run the same command with --resume "
                                    "to continue") from None
    return steps, pruner, log


def _build_trainer(net, recipe: Recipe, data: dict, device, dense_val_loss: float, teacher, oneshot: bool,
                   notify) -> Trainer:
    """Pruner (running a one-shot method when `oneshot`), optimizer and trainer for the whole run."""
    torch.manual_seed(recipe.seed)
    steps = total_steps(recipe, len(data["train"]))
    pruner = build_pruner(net, recipe.prune, steps, data["calibration"], recipe.eval.batch_size, oneshot=oneshot,
                          progress=lambda e: notify({**e, "stage": "oneshot"}))
    if pruner.history:  # every process ran the one-shot method; all continue from rank 0's result
        dist.broadcast_tensors([*pruner.weights.values(), *pruner.masks.values()])
    if recipe.train.parallel == "fsdp" and dist.world_size() > 1:
        sharding.check_pattern(pruner)
        for model in (net, teacher):
            if model is not None:
                sharding.shard(model)
    optimizer = build_optimizer(net, recipe, pruner, ref_loss=dense_val_loss)
    trainer = Trainer(net, pruner, optimizer, data["train"], data["val"], recipe, steps, device, teacher)
    trainer.log.mask_updates.extend(pruner.history)  # a one-shot mask: the update at step 0
    return trainer


# Exports of SmolLM2-135M took about 2 minutes on 2 CPU cores (ONNX fp32 with its parity check 15 s, int8 10 s,
# GPTQ int4 on 32 windows 98 s; their perplexities are counted with the evaluations); a dry run scales that by
# the parameter count, without running them.
EXPORT_SECONDS_PER_PARAM = 125 / 134.5e6


def _dry_run(net, recipe: Recipe, data: dict, device, val, estimate, notify, eval_len: int, setup_seconds: float,
             timed: int = 3) -> dict:
    """The plan of the run: steps, seconds per step from a few real steps, the whole job's wall time from
    them and one timed evaluation batch, memory; nothing is written."""
    dense_val_loss = mean_loss(net, val, recipe.train.batch_size, device) if len(val) else 0.0
    teacher = teacher_copy(net) if uses_teacher(recipe.train) else None
    trainer = _build_trainer(net, recipe, data, device, dense_val_loss, teacher, True, notify)
    trainer.score_before_first_mask = False  # time the steps the run mostly takes, teacher and optimizer included
    steps = trainer.steps
    oneshot_seconds = next((u["seconds"] for u in trainer.pruner.history if u.get("method")), None)
    times = []
    for _ in range(min(timed, steps)):
        notify({"stage": "dry-run", "done": len(times), "total": min(timed, steps)})
        begin = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - begin)
    warm = times[1:] or times  # the first step warms up
    per_step = statistics.median(warm) if warm else 0.0
    # Evaluation: the dense model, the pruned one beside its dense reference (two forward passes), and
    # each quantized ONNX model, over the same tokens; timed on one batch of windows.
    sample = data["test"][: recipe.eval.batch_size * eval_len + 1]
    begin = time.perf_counter()
    perplexity(net, sample, eval_len, batch_size=recipe.eval.batch_size, device=device)
    per_token = (time.perf_counter() - begin) / max(1, sample.numel() - 1)
    tokens = min(recipe.eval.max_tokens or data["test"].numel(), data["test"].numel())
    passes = 3 + (len(recipe.export.quantize) if recipe.export.onnx else 0)
    eval_seconds = per_token * tokens * passes
    params = estimate.params if estimate else sum(p.numel() for p in set(net.parameters()))
    export_seconds = EXPORT_SECONDS_PER_PARAM * params if recipe.export.onnx else 0.0
    wall = setup_seconds + per_step * steps + eval_seconds + export_seconds + (oneshot_seconds or 0.0)
    return {"dry_run": True, "steps": steps, "timed_steps": times, "seconds_per_step": per_step,
            "train_seconds_estimate": per_step * steps, "oneshot_seconds": oneshot_seconds,
            "setup_seconds": setup_seconds, "eval_seconds_estimate": eval_seconds,
            "export_seconds_estimate": export_seconds, "wall_seconds_estimate": wall,
            "train_windows": len(data["train"]), "memory_estimate": estimate.to_dict() if estimate else None,
            "measured_peak_rss": peak_rss(), "device": str(device), "processes": dist.world_size()}


def _add_self_distillation(net, tokenizer, recipe: Recipe, data: dict, seq_len: int) -> None:
    """The dense model's answers to the first `data.self_distill` instruction prompts, into the training windows."""
    count, share = recipe.data.self_distill, recipe.data.self_distill_share
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("data.self_distill needs a chat model (a tokenizer with a chat template); "
                         "this one has none: set data.self_distill to 0")
    stream = chat_stream(net, tokenizer, instruction_prompts()[:count])
    if stream.numel() < seq_len:  # a few short answers: repeat them to fill one window
        stream = stream.repeat(-(-seq_len // stream.numel()))
    data["train"] = mix_windows(data["train"], windows(stream, seq_len), share)
    data["tokens_per_split"]["self_distill"] = stream.numel()
    data["notes"].append(f"self-distillation: the dense model's greedy answers to {count} instruction prompts "
                         f"({stream.numel():,} tokens) make up {share:.0%} of the training windows")


def _prepare_data(recipe: Recipe, tokenizer, seq_len: int) -> dict:
    """Tokenize the splits once; training and validation as windows, test as one stream."""
    dataset = load_texts(recipe.data.dataset)
    tokens = {split: tokenize(tokenizer, text) for split, text in dataset.texts.items()}
    train_windows = windows(tokens["train"], seq_len)
    if len(train_windows) == 0:
        raise UsageError(
            f"the training text has {tokens['train'].numel()} tokens, less than one window of {seq_len}; "
            "give more text or a smaller --seq-len"
        )
    if tokens["test"].numel() < 2:
        raise UsageError("the test text has fewer than 2 tokens; give more text in test.txt")
    return {"train": train_windows, "train_text": tokens["train"], "val": windows(tokens["validation"], seq_len),
            "test": tokens["test"],
            "source": dataset.source, "notes": dataset.notes,
            "tokens_per_split": {split: t.numel() for split, t in tokens.items()}}
