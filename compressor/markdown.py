"""The run report as a Markdown page (`OUT/report.md`).

Written for someone who did not run the job: a CI artifact or a pull-request comment
read cold. The verdict comes first, then the numbers behind it, the recipe, the two
plots with what they show in words (so the page still reads where images do not
load), and the per-layer table last. Everything comes from `report.json` and
`training_log.json`, so the page can be rendered again from a finished run.
"""

from __future__ import annotations

from .report import structure_line
from .plots import layer_kind, model_name


def duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def count(n: float) -> str:
    """12,345 below a million, else 134.5M: exact where exactness is readable."""
    return f"{n:,}" if abs(n) < 1_000_000 else f"{n / 1e6:,.1f}M"


def size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:,.0f} {unit}" if unit == "B" else f"{nbytes:,.1f} {unit}"
        nbytes /= 1000
    raise AssertionError


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list], align: str) -> list[str]:
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _fields(rows: list[list[str]]) -> list[str]:
    """Label-value pairs as a list: reads as well in a PR comment as in a file viewer."""
    return [f"- **{label}**: {value}" for label, value in rows]


def _model_line(report: dict) -> str:
    model = report.get("model", {})
    parts = [model.get("architecture"), f"{count(model['parameters'])} parameters" if "parameters" in model else None]
    kind = model.get("kind")
    if kind == "hub":
        parts.append(f"Hub id, revision {model.get('revision', 'main')}")
    elif kind:
        parts.append(kind)
    sha = model.get("sha256")
    if isinstance(sha, str):
        parts.append(f"sha256 `{sha[:12]}…`")
    return f"`{model_name(report)}` ({', '.join(p for p in parts if p)})"


def _recipe_rows(recipe: dict, seq_len: int | None) -> list[list[str]]:
    p, o, ta, t, d = recipe["prune"], recipe["optim"], recipe["ta"], recipe["train"], recipe["data"]
    schedule = f"{p['schedule']}, mask update every {p['prune_every']} steps"
    if p["schedule"] == "dynamic":
        schedule += (f"; warmup {p['warmup']:.0%}, τ {p['tau']:.0%}, exact target at {p['final']:.0%} of the run, "
                     f"stability λ {p['stability']:g}")
    else:
        schedule += f"; warmup {p['warmup']:.0%}, exact target at {p['final']:.0%} of the run"
    calibration_len = p.get("calibration_len") or seq_len or d["seq_len"]
    calibration = f"{p['calibration_windows']} calibration windows of {calibration_len} tokens"
    saliency = p["saliency"]
    if saliency == "taylor":
        saliency += f" (running average, momentum {p['score_momentum']:g})"
    elif saliency == "global-wanda":
        saliency += f" (activations on {calibration})"
    if p.get("pattern") not in (None, "unstructured"):
        saliency += f"; pattern {p['pattern']}"
    optim = (f"AdamW lr {o['lr']:g} ({o['lr_schedule']}), weight decay {o['weight_decay']:g}, "
             f"betas {tuple(o['betas'])}, grad clip {o['grad_clip']}")
    if ta["enabled"]:
        ta_lr = o["lr"] if ta["lr"] is None else ta["lr"]
        ta_text = (f"on: η_TA {ta_lr:g}, γ {ta['gamma']:g}, β {ta['beta']:g}, C {ta['clip']:g}, k {ta['k']:g}, "
                   f"attractor to {'zero' if ta['target'] == 'zero' else 'the dense loss'}, "
                   f"{ta['space']} space")
    else:
        ta_text = "off (plain AdamW)"
    batch = f"{t['batch_size'] * t['grad_accum']} windows of {seq_len or d['seq_len']} tokens per step"
    if t["grad_accum"] > 1:
        batch += f" ({t['grad_accum']} accumulated micro-batches of {t['batch_size']})"
    method = p.get("method", "dynamic")
    if method != "dynamic":
        method += f", one-shot layer by layer on {calibration}; the mask then stays fixed"
    elif p.get("start", "dense") != "dense":
        method += f", starting from a one-shot {p['start']} mask at the target"
    return [
        ["method", method],
        ["saliency", saliency],
        ["schedule", schedule + ("; regrowth on" if p["regrowth"] else "; no regrowth")],
        ["optimizer", optim],
        ["terminal attractor", ta_text],
        ["batch", batch],
    ]


def _training_story(report: dict, log: dict | None) -> list[str]:
    steps = report["train"]["steps"]
    if not log:
        return []
    updates = log.get("mask_updates") or []
    lines = []
    if updates and updates[0].get("method"):
        first, updates = updates[0], updates[1:]
        lines.append(f"- One-shot {first['method']} mask at step 0, layer by layer from calibration text: "
                     f"{first['masked']:,} weights ({first['sparsity']:.2%}) in {first['seconds']:.0f} s."
                     + (" The mask stayed fixed." if report["recipe"]["prune"]["method"] != "dynamic" else ""))
        if not updates:
            return lines + _loss_lines(log)
    if updates:
        last = updates[-1]
        lines.append(
            f"- {len(updates)} mask updates from step {updates[0]['step']} to step {last['step']}; "
            f"{sum(u['pruned'] for u in updates):,} weights pruned and {sum(u['regrown'] for u in updates):,} "
            f"regrown along the way."
        )
        if last["step"] < steps:
            lines.append(f"- The target was reached at step {last['step']}; the last {steps - last['step']} "
                         "steps trained with the mask fixed (recovery only).")
    else:
        lines.append("- No mask update ran (target 0, or the run ended before the schedule began).")
    return lines + _loss_lines(log)


def _loss_lines(log: dict) -> list[str]:
    lines = []
    validation = log.get("validation") or []
    if validation:
        dense = validation[0]["loss"] if validation[0]["step"] == 0 else None
        parts = [f"{v['loss']:.3f} at step {v['step']}" for v in validation[1:] if v["step"] > 0]
        if dense is not None and parts:
            lines.append(f"- Validation loss: {dense:.3f} dense, then " + ", ".join(parts) + ".")
    loss = log.get("loss") or []
    if loss:
        tail = loss[-max(1, len(loss) // 10):]
        lines.append(f"- Training loss: {loss[0]:.3f} at step 1, {sum(tail) / len(tail):.3f} "
                     f"averaged over the last {len(tail)} steps.")
    return lines


def _layer_lines(report: dict) -> list[str]:
    layers = report["sparsity"]["layers"]
    if not layers:
        return []
    by_sparsity = sorted(layers, key=lambda layer: layer["sparsity"])
    lines = [f"- Most pruned: `{by_sparsity[-1]['name']}` {by_sparsity[-1]['sparsity']:.1%}; "
             f"least pruned: `{by_sparsity[0]['name']}` {by_sparsity[0]['sparsity']:.1%}."]
    totals: dict[str, list[int]] = {}
    for layer in layers:
        zeros_params = totals.setdefault(layer_kind(layer["name"]), [0, 0])
        zeros_params[0] += layer["zeros"]
        zeros_params[1] += layer["params"]
    if len(totals) > 1:
        label = {"attention": "attention", "mlp": "MLP", "other": "other"}
        lines.append("- By kind: " + "; ".join(
            f"{label[k]} {z / n:.1%} of {count(n)} weights" for k, (z, n) in totals.items() if n) + ".")
    return lines


def _export_lines(exported: dict) -> list[str]:
    """The edge files: what each is, how big, and how it was checked against the PyTorch model."""
    if not exported:
        return []
    lines = ["## Edge export", ""]
    onnx = exported.get("onnx", {})
    if "error" in onnx:
        lines += [f"**The ONNX export failed**: {onnx['error']}", ""]
    elif onnx:
        cases = ", ".join(f"{c['batch']}×{c['prefill']} then {c['decode_steps']} cached steps"
                          for c in onnx["logits"]["cases"])
        same = sum(g["identical"] for g in onnx["greedy"])
        lines += [f"`{onnx['path']}`: decoder with KV cache, {size(onnx['bytes'])}, written by {onnx['exporter']}; "
                  f"runs in onnxruntime and onnxruntime-genai (`genai_config.json`).", "",
                  f"- Logits against PyTorch: max |difference| {onnx['logits']['max_abs_diff']:.2g}, "
                  f"{onnx['logits']['worst_fraction_of_tolerance']:.0%} of its tolerance (the largest of "
                  f"{onnx['logits']['atol']:g}, {onnx['logits']['rtol']:g} × the largest logit and "
                  f"{onnx['logits']['fp32_factor']:g} × PyTorch's own fp32 error) on {cases}.",
                  f"- Greedy text of {len(onnx['greedy'])} prompts, {onnx['greedy'][0]['new_tokens']} tokens each: "
                  f"identical to PyTorch's for {same}.", ""]
    rows = []
    for kind in ("int8", "int4"):
        q = exported.get(kind)
        if not q:
            continue
        diverge = _divergence(q["greedy"])
        quality = ([f"{q['perplexity']['ppl']:.3f} ({q['ppl_increase']:+.1%})", f"{q['top1_agreement']:.1%}",
                    _kl(q["perplexity"])] if "perplexity" in q else ["not measured"] * 3)
        rows.append([f"`{q['path']}`", size(q["bytes"]), f"{q['bytes_ratio']:.3f}", *quality, diverge,
                     q["projections"]])
    if rows:
        lines += _table(["model", "size", "× fp32", "perplexity (vs PyTorch)", "top-1 agreement", "KL to dense",
                         "greedy text vs PyTorch", "weights"], rows, align="lrrrrrll") + [""]
    lines += _gguf_lines(exported.get("gguf", {}))
    sparse = exported.get("sparse")
    if sparse:
        lines += [f"`{sparse['path']}`: {size(sparse['bytes'])}, {sparse['file_ratio']:.3f} of the dense file "
                  "(non-zero values and a bitmask; restores the weights exactly).", ""]
    return lines


def _gguf_lines(ggufs: dict) -> list[str]:
    """The GGUF files, each as transformers' GGUF loader reads it back."""
    if "error" in ggufs:
        return [f"**The GGUF export failed**: {ggufs['error']}", ""]
    rows = [[f"`{g['path']}`", size(g["bytes"]), f"{g['bytes_ratio']:.3f}",
             f"{g['perplexity']['ppl']:.3f} ({g['ppl_increase']:+.1%})" if "perplexity" in g else "not measured",
             f"{g['top1_agreement']:.1%}" if "perplexity" in g else "not measured",
             _kl(g["perplexity"]) if "perplexity" in g else "not measured",
             f"{g['max_abs_logit_diff']:.2g}", f"{g['zeros_kept']:.2%}", _divergence(g["greedy"])]
            for g in ggufs.values()]
    if not rows:
        return []
    first = next(iter(ggufs.values()))
    return [f"GGUF for llama.cpp, Ollama and LM Studio ({first['architecture']}; metadata {first['metadata']}), "
            "each read back with transformers' GGUF loader:", "",
            *_table(["file", "size", "× safetensors", "perplexity (vs PyTorch)", "top-1 agreement", "KL to dense",
                     "max |logit diff|", "pruned zeros kept", "greedy text vs PyTorch"], rows, align="lrrrrrrrl"), ""]


def _kl(ppl: dict) -> str:
    """KL(dense || model) of a perplexity measured against the dense model; "-" when it was not."""
    return "-" if ppl.get("kl") is None else f"{ppl['kl']:.4f}"


def _divergence(greedy: list[dict]) -> str:
    return ", ".join("same" if g["identical"] else f"from token {g['diverges_at']}" for g in greedy)


_LOSSES = {"ce": "cross-entropy on the training text, which adapts the model to that text",
           "kd": "distillation from the dense model", "ce+kd": "cross-entropy plus distillation from the dense model"}


def render_markdown(report: dict, log: dict | None = None, plots: dict[str, str] | None = None,
                    skipped: list[str] | None = None) -> str:
    """The page: verdict, numbers, recipe, plots, per-layer table."""
    sp, ppl, train = report["sparsity"], report["perplexity"], report["train"]
    recipe = report["recipe"]
    target = recipe["prune"]["sparsity"]
    dense, pruned = ppl["dense"], ppl["pruned"]
    plots = plots or {}
    lines = [
        f"# {model_name(report)} pruned to {target:.0%} sparsity",
        "",
        f"**Perplexity {dense['ppl']:.2f} → {pruned['ppl']:.2f} ({ppl['increase']:+.1%})** at "
        f"{sp['prunable_sparsity']:.2%} sparsity of the prunable weights, after {train['steps']:,} "
        f"steps of pruning and recovery in {duration(report.get('seconds', train['seconds']))}.",
        "",
    ]
    if pruned.get("kl") is not None:
        lines += [f"**Drift from the dense model: KL {pruned['kl']:.4f} nats/token, top-1 agreement "
                  f"{pruned['agreement']:.1%}** on the same test tokens (recovery loss: "
                  f"{_LOSSES[recipe['train'].get('loss', 'ce')]}).", ""]
    sizes = report.get("size", {})
    size_text = f"{count(sp['nonzero_params'])} non-zero of {count(sp['total_params'])} parameters"
    if report.get("structure"):
        structure = report["structure"]
        lines += [f"**Cut to a smaller model:** {structure_line(structure).split(maxsplit=1)[1]}.", ""]
        if "model_bytes" in sizes:
            size_text += f"; `model/` takes {size(sizes['model_bytes'])} on disk (the smaller matrices)"
    elif "model_bytes" in sizes:
        size_text += f"; `model/` takes {size(sizes['model_bytes'])} on disk (dense layout: the zeros are stored)"
    tokens_per_s = train["tokens"] / train["seconds"] if train["seconds"] else 0.0
    dataset = report.get("dataset", {})
    data_text = str(dataset.get("source", ""))
    if dataset.get("tokens"):
        data_text += " (" + ", ".join(f"{k} {v:,} tokens" for k, v in dataset["tokens"].items()) + ")"
    for note in dataset.get("notes") or []:
        data_text += f"; {note}"
    rows = [
        ["model", _model_line(report)],
        ["perplexity", f"{dense['ppl']:.3f} dense → {pruned['ppl']:.3f} pruned ({ppl['increase']:+.2%}); "
                       f"{pruned['protocol']}, {pruned['tokens']:,} test tokens"],
        ["global sparsity", f"{sp['prunable_sparsity']:.4%} of {sp['prunable_params']:,} prunable weights "
                            f"(target {target:.2%}); {sp['total_sparsity']:.2%} of all parameters"],
        ["size", size_text],
        ["time", f"{duration(report.get('seconds', train['seconds']))} in all; training {train['steps']:,} steps, "
                 f"{train['tokens']:,} tokens in {duration(train['seconds'])} ({tokens_per_s:,.0f} tokens/s) "
                 f"on {report.get('device', '?')}"],
        ["data", data_text],
        ["tool", f"tapc {report.get('version', '?')}, torch {report.get('platform', {}).get('torch', '?')}, "
                 f"python {report.get('platform', {}).get('python', '?')}"],
    ]
    lines += _fields(rows) + [""]

    lines += [f"## Recipe: `{recipe['name']}`", ""]
    if recipe.get("description"):
        lines += [recipe["description"], ""]
    lines += _fields(_recipe_rows(recipe, report.get("seq_len")))
    lines += ["", "The recipe as it ran, every field, is in `recipe.yaml`; the step-by-step log in "
              "`training_log.json`.", ""]

    lines += ["## Training", ""]
    if "training" in plots:
        lines += [f"![Training loss per step (raw and smoothed), validation loss, and sparsity rising to "
                  f"{target:.0%} with each mask update marked]({plots['training']})", ""]
    lines += _training_story(report, log) + [""]

    lines += ["## Where the zeros went", ""]
    if "layers" in plots:
        lines += [f"![Sparsity of each pruned weight matrix by block, attention and MLP told apart, global "
                  f"target {target:.0%}]({plots['layers']})", ""]
    lines += _layer_lines(report) + [""]
    for line in skipped or []:
        lines += [f"> {line}", ""]

    lines += _export_lines(report.get("export", {}))
    lines += [f"## Per-layer sparsity ({len(sp['layers'])} pruned weight matrices)", ""]
    lines += _table(
        ["layer", "shape", "parameters", "zeros", "sparsity"],
        [[f"`{layer['name']}`", " × ".join(str(s) for s in layer["shape"]), f"{layer['params']:,}",
          f"{layer['zeros']:,}", f"{layer['sparsity']:.2%}"] for layer in sp["layers"]],
        align="lrrrr",
    )
    lines += ["", f"Zeros are counted from the saved tensors. Output: `{report.get('output', '')}`.", ""]
    return "\n".join(lines)

