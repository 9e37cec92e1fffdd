"""`export_artifacts`, the call `compress` makes after saving `OUT/model/`, and `export_model`, the same
for any saved model directory (`tapc export`). Each folder appears whole or not at all, and an ONNX
or GGUF failure never takes the other outputs with it."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import JobError, UsageError
from ..evaluate import Evaluation
from ..folder import check_output_dir, write_json
from ..recipe import ExportConfig
from ..sparse import FILENAME, write_sparse
from .onnx_outputs import QUANTIZED, onnx_folders, write_onnx


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
    from ..models import window_length

    notify({"stage": "data", "dataset": dataset})
    texts = load_texts(dataset)
    seq_len = window_length(model, seq_len)
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
