"""Edge artifacts of a saved model: the compact sparse safetensors and the ONNX models.

`export_artifacts` is the one call `compress` makes after saving `OUT/model/`; the
`export` function does the same for any saved model directory (`tapc export`).

An ONNX failure never takes the other outputs with it: the sparse artifact and the
safetensors model stay, the report records the error, and the caller raises it once
everything else is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import JobError, UsageError
from .export import check_output_dir, staged_output, write_json
from .onnx_export import INT8_NAME, OnnxCausalLM, export_onnx, quantize_int8
from .recipe import ExportConfig
from .sparse_format import FILENAME, save_sparse

# The 1-bit mask costs 1/32 of a float32 weight; 1% covers shapes and row padding.
SIZE_SLACK = 1 / 32 + 0.01


def _copy_side_files(model_dir: Path, folder: Path) -> None:
    """Config and tokenizer travel with every artifact, so each folder loads on its own."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and not path.name.endswith(".index.json"):
            shutil.copy2(path, folder / path.name)


def write_sparse(model_dir: Path, folder: Path, pruned: list[str]) -> dict:
    """`folder/model.sparse.safetensors` from the safetensors files in `model_dir`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    tensors, metadata = {}, {}
    for path in files:
        tensors.update(load_file(str(path)))
        with safe_open(str(path), framework="pt") as fh:
            metadata.update(fh.metadata() or {})
    pruned = [n for n in pruned if n in tensors]
    _copy_side_files(Path(model_dir), folder)
    sizes = save_sparse(tensors, pruned, folder / FILENAME, metadata)
    dense_file = sum(p.stat().st_size for p in files)
    sparse_file = (folder / FILENAME).stat().st_size
    zeros = sum(int((tensors[n] == 0).sum()) for n in pruned)
    params = sum(tensors[n].numel() for n in pruned)
    sparsity = zeros / params if params else 0.0
    return {
        "file": FILENAME,
        "bytes": sparse_file,
        "dense_bytes": dense_file,
        "file_ratio": sparse_file / dense_file,
        **sizes,
        "pruned_sparsity": sparsity,
        "pruned_ratio_bound": (1 - sparsity) + SIZE_SLACK,
    }


def write_onnx(model, model_dir: Path, folder: Path, config: ExportConfig, evaluate=None, progress=None) -> dict:
    """`folder/model.onnx` (checked against PyTorch) and, if asked, `model.int8.onnx`.

    Raises `JobError` on a failed export or check. `evaluate(model_like)` returns a
    `Perplexity`; given, the int8 model is evaluated with it.
    """
    notify = progress or (lambda event: None)
    _copy_side_files(Path(model_dir), folder)
    notify({"stage": "export-onnx"})
    result = {"onnx": export_onnx(model, folder, atol=config.onnx_atol)}
    if config.int8:
        notify({"stage": "export-int8"})
        result["int8"] = quantize_int8(model, folder)
        if evaluate is not None:
            result["int8"]["perplexity"] = evaluate(OnnxCausalLM(folder / INT8_NAME)).to_dict()
    return result


def export_artifacts(model, model_dir: Path, out: Path, config: ExportConfig, pruned: list[str], *,
                     evaluate=None, progress=None) -> dict:
    """Write `out/sparse/` and `out/onnx/` for `model`, already saved in `model_dir`.

    An ONNX error is returned as `{"onnx": {"error": ...}}` and `out/onnx/` removed,
    so that the caller can keep everything else and raise it afterwards.
    """
    notify = progress or (lambda event: None)
    result: dict = {}
    if config.sparse:
        notify({"stage": "export-sparse"})
        result["sparse"] = write_sparse(model_dir, out / "sparse", pruned)
    if config.onnx:
        try:
            result.update(write_onnx(model, model_dir, out / "onnx", config, evaluate, notify))
        except JobError as exc:
            shutil.rmtree(out / "onnx", ignore_errors=True)
            result["onnx"] = {"error": str(exc)}
    for name, folder in (("sparse", "sparse"), ("onnx", "onnx"), ("int8", "onnx")):
        if "file" in result.get(name, {}):
            result[name]["path"] = f"{folder}/{result[name]['file']}"
    return result


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
        lines.append(f"onnx              {onnx['path']}: {onnx['bytes'] / mb:.1f} MB, max |logit diff| vs "
                     f"PyTorch {onnx['max_abs_diff']:.2g} (atol {onnx['atol']:g}), export {onnx['seconds']:.1f} s")
    if "int8" in exported:
        q = exported["int8"]
        ppl = f", perplexity {q['perplexity']['ppl']:.3f}" if "perplexity" in q else ""
        lines.append(f"onnx int8         {q['path']}: {q['bytes'] / mb:.1f} MB, max |logit diff| "
                     f"{q['max_abs_diff']:.2g}{ppl}")
    return lines


def onnx_error(exported: dict) -> str | None:
    return exported.get("onnx", {}).get("error")


def export_model(model_dir: str | Path, out: str | Path | None = None, *, config: ExportConfig | None = None,
           overwrite: bool = False, progress=None) -> dict:
    """Export a saved model directory to `OUT/sparse/` and `OUT/onnx/` (`tapc export`).

    The default OUT is the parent of a folder named `model` (where `compress` puts
    them), else `MODEL-export`. The pruned tensors are the model's projection weights,
    found from its architecture. Each folder appears whole or not at all; an ONNX
    failure raises `JobError` after the sparse artifact is written.
    """
    from .models import load_model, prunable_weights

    model_dir = Path(model_dir)
    if not model_dir.is_dir() or not list(model_dir.glob("*.safetensors")):
        raise UsageError(f"{model_dir} is not a saved model directory with *.safetensors; give OUT/model of a run")
    config = config or ExportConfig()
    if not (config.onnx or config.sparse):
        raise UsageError("nothing to export: enable --onnx or --sparse")
    if out is None:
        out = model_dir.parent if model_dir.resolve().name == "model" else model_dir.with_name(f"{model_dir.name}-export")
    out = Path(out)
    for name, wanted in (("sparse", config.sparse), ("onnx", config.onnx)):
        if wanted:
            check_output_dir(out / name, overwrite)
    notify = progress or (lambda event: None)
    notify({"stage": "load", "model": str(model_dir)})
    loaded = load_model(str(model_dir))
    pruned = [f"{name}.weight" for name in prunable_weights(loaded.model)]
    result: dict = {"model": str(model_dir), "output": str(out)}
    if config.sparse:
        notify({"stage": "export-sparse"})
        with staged_output(out / "sparse", overwrite) as stage:
            result["sparse"] = {**write_sparse(model_dir, stage, pruned), "path": f"sparse/{FILENAME}"}
    if config.onnx:
        try:
            with staged_output(out / "onnx", overwrite) as stage:
                onnx = write_onnx(loaded.model, model_dir, stage, config, progress=notify)
        except JobError as exc:
            if config.sparse:
                raise JobError(f"{exc} ({out / 'sparse'} was written)") from exc
            raise
        for name, part in onnx.items():
            result[name] = {**part, "path": f"onnx/{part['file']}"}
    write_json(out / "export.json", result)
    return result
