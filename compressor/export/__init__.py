"""Everything tapc writes for deployment, and the checks that each file computes what the model does.

    OUT/model/      the pruned model, Hugging Face layout (folder.py)
    OUT/sparse/     non-zero values + bitmask safetensors (sparse.py)
    OUT/onnx/       fp32 decoder with KV cache + genai_config.json (graph.py), checked
                    against PyTorch (parity.py)
    OUT/onnx-int8/  weight-only int8 and int4 copies (quantize.py), each a folder that
    OUT/onnx-int4/  onnxruntime-genai and `tapc generate` run as it is
    OUT/gguf/       model-TYPE.gguf for llama.cpp, Ollama and LM Studio, read back with
                    transformers and measured (gguf.py)

`export_artifacts` is the call `compress` makes after saving `OUT/model/`;
`export_model` does the same for any saved model directory (`tapc export`).

An ONNX or GGUF failure never takes the other outputs with it: the sparse artifact and
the safetensors model stay, the report records the error, and the caller raises it
once everything else is written.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import JobError, UsageError
from ..recipe import ExportConfig
from .folder import check_output_dir, write_json
from .sparse import FILENAME, write_sparse

QUANTIZED = {"int8": 8, "int4": 4}


@dataclass
class Evaluation:
    """Perplexity by the run's protocol: `run(model_like, top1)` -> Perplexity, and the fp32 model's own."""

    run: Callable
    reference: object  # Perplexity of the PyTorch model
    reference_top1: list

    def measure(self, model_like) -> dict:
        """Perplexity of `model_like`, its change from the PyTorch model's, and their top-1 agreement."""
        from ..evaluate import top1_agreement

        top1: list = []
        ppl = self.run(model_like, top1)
        return {"perplexity": ppl.to_dict(), "ppl_increase": ppl.ppl / self.reference.ppl - 1.0,
                "top1_agreement": top1_agreement(top1, self.reference_top1)}


def onnx_folders(kinds) -> list[str]:
    return ["onnx", *(f"onnx-{kind}" for kind in kinds)]


def export_artifacts(model, tokenizer, model_dir: Path, out: Path, config: ExportConfig, pruned: list[str], *,
                     evaluation: Evaluation | None = None, calibration: torch.Tensor | None = None,
                     gguf_base: Path | None = None, progress=None) -> dict:
    """Write `out/sparse/`, the ONNX folders and `out/gguf/` for `model`, already saved in `model_dir`.

    An ONNX or GGUF error is returned as `{"onnx": {"error": ...}}` (or "gguf") with
    its folders removed, so that the caller can keep everything else and raise it afterwards.
    """
    notify = progress or (lambda event: None)
    result: dict = {}
    if config.sparse:
        notify({"stage": "export-sparse"})
        result["sparse"] = {**write_sparse(model_dir, out / "sparse", pruned), "path": f"sparse/{FILENAME}"}
    if config.onnx:
        try:
            result.update(write_onnx(model, tokenizer, model_dir, out, config, evaluation, calibration, notify))
        except JobError as exc:
            for name in onnx_folders(QUANTIZED):
                shutil.rmtree(out / name, ignore_errors=True)
            for name in QUANTIZED:
                result.pop(name, None)
            result["onnx"] = {"error": str(exc)}
    if config.gguf:
        from .gguf import export_gguf

        try:
            result["gguf"] = export_gguf(model, tokenizer, model_dir, out / "gguf", config.gguf, pruned,
                                         base=gguf_base, evaluation=evaluation, notify=notify)
        except (JobError, UsageError) as exc:
            shutil.rmtree(out / "gguf", ignore_errors=True)
            result["gguf"] = {"error": str(exc)}
    return result


def write_onnx(model, tokenizer, model_dir: Path, out: Path, config: ExportConfig, evaluation: Evaluation | None,
               calibration: torch.Tensor | None, notify) -> dict:
    """`out/onnx/` checked against PyTorch, then `out/onnx-int8/` and `out/onnx-int4/` with their quality."""
    from ..generation import OnnxDecoder, TorchDecoder
    from .graph import ONNX_NAME, export_decoder
    from .parity import (FP32_FACTOR, check_greedy, check_logits, greedy_failures, logit_failures, prompt_ids,
                         reference_logits)

    notify({"stage": "export-onnx"})
    info = {**export_decoder(model.eval(), model_dir, out / "onnx"), "path": f"onnx/{ONNX_NAME}"}
    references = reference_logits(model)  # the float64 pass first, before onnxruntime holds the graph's weights
    decoder = OnnxDecoder(out / "onnx" / ONNX_NAME)
    reference, prompts = TorchDecoder(model), prompt_ids(tokenizer)
    info["logits"] = check_logits(model, decoder, atol=config.onnx_atol, rtol=config.onnx_rtol, references=references)
    info["greedy"] = check_greedy(reference, decoder, prompts, tokenizer)
    failures = logit_failures(info["logits"])
    failures += [f"greedy text of prompt {g['prompt']!r} differs at token {g['diverges_at']}"
                 for g in greedy_failures(info["greedy"], info["logits"]["tolerance"])]
    if failures:
        raise JobError(f"the ONNX model disagrees with PyTorch ({'; '.join(failures)}); it was not kept. The "
                       "tolerance is the largest of export.onnx_atol, export.onnx_rtol times the largest logit and "
                       f"{FP32_FACTOR:g} times PyTorch's own fp32 error: raise onnx_atol or onnx_rtol if the "
                       "difference is acceptable, or skip ONNX with --no-onnx")
    result = {"onnx": info}
    del decoder
    for kind in config.quantize:
        result[kind] = write_quantized(model, kind, out, config, evaluation, calibration, reference, prompts,
                                       tokenizer, info["bytes"], notify)
    return result


def write_quantized(model, kind: str, out: Path, config: ExportConfig, evaluation: Evaluation | None,
                    calibration: torch.Tensor | None, reference, prompts, tokenizer, fp32_bytes: int, notify) -> dict:
    """`out/onnx-KIND/`: the quantized decoder, its size, and how far its predictions move from fp32."""
    from ..generation import OnnxDecoder
    from ..models import prunable_weights
    from ..patterns import as_rows
    from .graph import ONNX_NAME
    from .parity import check_greedy
    from .quantize import quantize_decoder

    bits = QUANTIZED[kind]
    notify({"stage": f"export-{kind}"})
    layers = {name: as_rows(module.weight.detach().float().cpu(), module)
              for name, module in prunable_weights(model).items()}
    calibrated, eight_bit = None, set()
    if bits == 4:
        eight_bit = _last_layers(model, config.int4_int8_layers if config.int4_layout == "accurate" else 0.0)
        if calibration is not None and len(calibration):
            from ..gptq import quantize_modules

            notify({"stage": "calibrate-int4"})
            calibrated = quantize_modules(model, prunable_weights(model), calibration,
                                          block_size=config.int4_block_size,
                                          progress=lambda e: notify({**e, "stage": "calibrate-int4"}))
    folder = out / f"onnx-{kind}"
    info = quantize_decoder(out / "onnx", folder, bits, block_size=config.int4_block_size if bits == 4 else 32,
                            layers=layers, calibrated=calibrated, eight_bit=eight_bit,
                            head_bits=8 if config.int4_layout == "accurate" else 4)
    info.update(path=f"onnx-{kind}/{ONNX_NAME}", bytes_ratio=info["bytes"] / fp32_bytes,
                layout=config.int4_layout if bits == 4 else None,
                calibration_windows=len(calibration) if calibrated else 0)
    decoder = OnnxDecoder(folder / ONNX_NAME)
    info["greedy"] = check_greedy(reference, decoder, prompts, tokenizer)
    if evaluation is not None:
        notify({"stage": f"eval-{kind}"})
        info.update(evaluation.measure(decoder))
    return info


def _last_layers(model, fraction: float) -> set[str]:
    """Projection names in the last `fraction` of the decoder layers (at least one layer when fraction > 0)."""
    from ..calibration import decoder_layers
    from ..models import prunable_weights

    if fraction <= 0:
        return set()
    layers = decoder_layers(model)
    last = list(layers)[len(layers) - max(1, int(len(layers) * fraction)):]
    inside = {id(sub) for layer in last for sub in layer.modules()}
    return {name for name, module in prunable_weights(model).items() if id(module) in inside}


def export_lines(exported: dict) -> list[str]:
    """One summary line per artifact, for the text output of `compress` and `export`."""
    mb = 1e6
    lines = []
    if "sparse" in exported:
        s = exported["sparse"]
        lines.append(f"sparse artifact   {s['path']}: {s['bytes'] / mb:.1f} MB, {s['file_ratio']:.3f} of the "
                     f"dense file; pruned tensors {s['pruned_ratio']:.3f} of their dense bytes "
                     f"(bound {s['pruned_ratio_bound']:.3f})")
    onnx = exported.get("onnx", {})
    if "error" in onnx:
        lines.append(f"onnx              FAILED: {onnx['error']}")
    elif onnx:
        same = sum(g["identical"] for g in onnx["greedy"])
        logits = onnx["logits"]
        lines.append(f"onnx fp32         {onnx['path']}: {onnx['bytes'] / mb:.1f} MB, KV cache, max |logit diff| vs "
                     f"PyTorch {logits['max_abs_diff']:.2g} ({logits['worst_fraction_of_tolerance']:.0%} of its "
                     f"tolerance), greedy text identical "
                     f"for {same}/{len(onnx['greedy'])} prompts; {onnx['exporter']}")
    for kind in QUANTIZED:
        if kind in exported:
            q = exported[kind]
            quality = _quality(q)
            lines.append(f"onnx {kind:<12} {q['path']}: {q['bytes'] / mb:.1f} MB ({q['bytes_ratio']:.3f} of fp32)"
                         f"{quality}")
    ggufs = exported.get("gguf", {})
    if "error" in ggufs:
        lines.append(f"gguf              FAILED: {ggufs['error']}")
    for kind, g in ({} if "error" in ggufs else ggufs).items():
        quality = _quality(g) or f", max |logit diff| vs PyTorch {g['max_abs_logit_diff']:.2g}"
        same = sum(r["identical"] for r in g["greedy"])
        lines.append(f"gguf {kind:<12} {g['path']}: {g['bytes'] / mb:.1f} MB ({g['bytes_ratio']:.3f} of the "
                     f"safetensors){quality}, pruned zeros kept {g['zeros_kept']:.2%}, greedy text identical for "
                     f"{same}/{len(g['greedy'])} prompts")
    return lines


def _quality(q: dict) -> str:
    if "perplexity" not in q:
        return ""
    kl = q["perplexity"].get("kl")
    return (f", perplexity {q['perplexity']['ppl']:.3f} ({q['ppl_increase']:+.1%}), top-1 agreement "
            f"{q['top1_agreement']:.1%}" + ("" if kl is None else f", KL to dense {kl:.4f}"))


def export_error(exported: dict) -> str | None:
    """The export errors (ONNX, GGUF) joined into one line, or None."""
    errors = [exported.get(key, {}).get("error") for key in ("onnx", "gguf")]
    return "; ".join(e for e in errors if e) or None


def export_model(model_dir: str | Path, out: str | Path | None = None, *, config: ExportConfig | None = None,
                 dataset: str | None = None, seq_len: int | None = None, max_tokens: int | None = None,
                 gguf_base: str | Path | None = None, overwrite: bool = False, progress=None) -> dict:
    """Export a saved model directory to `OUT/sparse/`, the ONNX folders and `OUT/gguf/` (`tapc export`).

    The default OUT is the parent of a folder named `model` (where `compress` puts
    them), else `MODEL-export`. With a `dataset`, the int4 model is calibrated (GPTQ) on
    its training text and every ONNX and GGUF model's perplexity and top-1 agreement are
    measured on its test text by the protocol of `compress`. Each folder appears whole
    or not at all; an ONNX or GGUF failure raises `JobError` after the rest is written.
    `gguf_base`: a `.gguf` whose metadata and tokenizer the GGUF files copy.
    """
    from ..models import load_model, prunable_weights

    model_dir = Path(model_dir)
    if not model_dir.is_dir() or not list(model_dir.glob("*.safetensors")):
        raise UsageError(f"{model_dir} is not a saved model directory with *.safetensors; give OUT/model of a run")
    config = config or ExportConfig()
    if not (config.onnx or config.sparse or config.gguf):
        raise UsageError("nothing to export: enable --onnx, --sparse or --gguf")
    if gguf_base is not None and not (str(gguf_base).endswith(".gguf") and Path(gguf_base).is_file()):
        raise UsageError(f"--gguf-base {gguf_base} is not a .gguf file; give the GGUF the model came from")
    if out is None:
        out = model_dir.parent if model_dir.resolve().name == "model" else model_dir.with_name(f"{model_dir.name}-export")
    out = Path(out)
    folders = ((["sparse"] if config.sparse else []) + (onnx_folders(config.quantize) if config.onnx else [])
               + (["gguf"] if config.gguf else []))
    for name in folders:
        check_output_dir(out / name, overwrite)
    notify = progress or (lambda event: None)
    notify({"stage": "load", "model": str(model_dir)})
    loaded = load_model(str(model_dir))
    model, tokenizer = loaded.model, loaded.tokenizer
    if config.gguf:
        from .gguf import gguf_architecture

        gguf_architecture(model)  # an unsupported model fails here, before anything is written
    evaluation = calibration = None
    if dataset is not None and (config.onnx or config.gguf):
        evaluation, calibration = _measure_with(model, tokenizer, dataset, seq_len, max_tokens, config, notify)
    pruned = [f"{name}.weight" for name in prunable_weights(model)]
    result: dict = {"model": str(model_dir), "output": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".export-partial-", dir=out))
    try:  # written beside their place, each folder renamed into it once all are done
        exported = export_artifacts(model, tokenizer, model_dir, stage, config, pruned, evaluation=evaluation,
                                    calibration=calibration, gguf_base=gguf_base and Path(gguf_base),
                                    progress=notify)
        for name in folders:
            if (stage / name).is_dir():
                shutil.rmtree(out / name, ignore_errors=True)
                (stage / name).rename(out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    result.update(exported)
    if evaluation is not None:
        result["perplexity"] = evaluation.reference.to_dict()
    write_json(out / "export.json", result)
    error = export_error(exported)
    if error:
        raise JobError(f"{error} ({out / 'sparse'} was written)" if config.sparse else error)
    return result


def _measure_with(model, tokenizer, dataset: str, seq_len: int | None, max_tokens: int | None, config: ExportConfig,
                  notify) -> tuple[Evaluation, torch.Tensor]:
    """The evaluation (test text) and int4 calibration windows (training text) of `dataset`."""
    from ..data import load_texts, tokenize, windows
    from ..evaluate import perplexity
    from ..models import model_context

    notify({"stage": "data", "dataset": dataset})
    texts = load_texts(dataset)
    context = model_context(model)
    seq_len = seq_len or min(context or 1024, 1024)
    if context and seq_len > context:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's context of {context} tokens; use at most {context}")
    test = tokenize(tokenizer, texts.texts["test"])
    if test.numel() < 2:
        raise UsageError("the test text has fewer than 2 tokens; give more text in test.txt")
    calibration = windows(tokenize(tokenizer, texts.texts["train"]), seq_len)[: config.calibration_windows]

    def run(model_like, top1):
        return perplexity(model_like, test, seq_len, max_tokens=max_tokens, top1=top1,
                          progress=lambda e: notify({**e, "stage": "eval"}))

    notify({"stage": "eval"})
    top1: list = []
    return Evaluation(run, run(model, top1), top1), calibration
