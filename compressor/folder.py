"""Output folders: the pruned model in Hugging Face layout, whole-or-nothing writes, and the file
names every artifact folder shares (read by loading and generation, written by the exports)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import UsageError


def save_model(model, tokenizer, folder: Path, metadata: dict[str, str]) -> None:
    """`save_pretrained` as safetensors, with `metadata` added to every safetensors file."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        save_file(load_file(str(path)), str(path), metadata={**meta, **metadata})


def read_metadata(folder: Path) -> dict[str, str]:
    meta: dict[str, str] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            meta.update(fh.metadata() or {})
    return meta


def directory_bytes(folder: Path) -> int:
    """Bytes of all files under `folder`, as they lie on disk before any compression."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Fail early, before any work, if `out` cannot be written."""
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"output {out} already exists; pass --overwrite or choose another --out")
    parent = out.resolve().parent
    probe_from = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if probe_from is None or not os.access(probe_from, os.W_OK) or not probe_from.is_dir():
        raise UsageError(f"cannot write output {out}: {probe_from} is not a writable directory; choose another --out")


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool):
    """Yield a temporary directory beside `out` that becomes `out` only on success.

    Readers never see a half-written output: on any error the staging directory is
    removed and an existing `out` stays as it was.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        stage.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        stage.rename(out)


ONNX_NAME = "model.onnx"  # with its weights beside it in model.onnx.data
GENAI_CONFIG = "genai_config.json"  # what onnxruntime-genai and `tapc generate` read beside an ONNX model
WEIGHT_FILES = (".safetensors", ".index.json", ".onnx", ".onnx.data", ".onnx_data")


def copy_side_files(source: Path, folder: Path) -> None:
    """Config, tokenizer (and genai_config.json) travel with every artifact, so each folder loads on its own."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in Path(source).iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_FILES):
            shutil.copy2(path, folder / path.name)


def onnx_bytes(path: Path) -> int:
    """Size of an ONNX model with its external data file, if any."""
    path = Path(path)
    return path.stat().st_size + sum(p.stat().st_size for p in external_data(path))


def external_data(path: Path) -> list[Path]:
    # torch and the builder write model.onnx.data; onnxruntime's quantizer can write model.onnx_data.
    return [p for p in (path.with_name(f"{path.name}.data"), path.with_name(f"{path.name}_data")) if p.exists()]
