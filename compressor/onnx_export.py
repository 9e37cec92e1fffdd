"""ONNX export checked against PyTorch, int8 dynamic quantization, and ONNX models for evaluation.

The graph takes `input_ids` (int64, batch x sequence, both dynamic) and returns
`logits` (batch x sequence x vocab); no KV cache, no attention mask (tapc's
perplexity protocol never pads). SPEC.md: the legacy TorchScript exporter fails on
these models, the dynamo exporter works, and an example input of size 1 in a
dimension would be specialized into a fixed shape, so the example is 2 x 8.

Every export is run with onnxruntime on shapes other than the example and compared
with PyTorch; all mismatches are collected before the export is declared failed.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from .errors import JobError, UsageError
from .models import model_context

ONNX_NAME = "model.onnx"
INT8_NAME = "model.int8.onnx"
EXAMPLE_SHAPE = (2, 8)
CHECK_SHAPES = ((1, 5), (3, 17), (1, 64))  # none equal to the example: dynamic axes are exercised


class LogitsOnly(nn.Module):
    """The causal LM as a function input_ids -> logits, the signature the ONNX graph gets."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


@contextlib.contextmanager
def _quiet():
    """The exporters log and warn freely; the library prints nothing (STYLE.md)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def onnx_bytes(path: Path) -> int:
    """Size of an ONNX model with its external data files, if any."""
    path = Path(path)
    return path.stat().st_size + sum(p.stat().st_size for p in _external_data(path))


def _external_data(path: Path) -> list[Path]:
    # torch writes model.onnx.data; onnxruntime's quantizer writes model.int8.onnx_data.
    return [p for p in (path.with_name(f"{path.name}.data"), path.with_name(f"{path.name}_data")) if p.exists()]


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the library does not print
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_against_torch(model: nn.Module, path: Path, vocab_size: int, shapes=CHECK_SHAPES,
                        seed: int = 0) -> dict:
    """Max absolute logit difference between onnxruntime and PyTorch on each shape."""
    session = _session(path)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    diffs = []
    for shape in shapes:
        ids = torch.randint(vocab_size, shape, generator=gen)
        with torch.no_grad():
            expected = model(input_ids=ids.to(device), use_cache=False).logits.float().cpu().numpy()
        got = session.run(["logits"], {"input_ids": ids.numpy()})[0]
        if got.shape != expected.shape:
            diffs.append({"shape": list(shape), "max_abs_diff": float("inf"),
                          "error": f"output shape {list(got.shape)}, expected {list(expected.shape)}"})
            continue
        diffs.append({"shape": list(shape), "max_abs_diff": float(np.abs(got - expected).max())})
    return {"shapes": diffs, "max_abs_diff": max(d["max_abs_diff"] for d in diffs)}


def export_onnx(model: nn.Module, folder: Path, *, atol: float = 1e-3, opset: int | None = None) -> dict:
    """Write `folder/model.onnx` and check it; raise `JobError` past `atol` (nothing is kept then)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ONNX_NAME
    model = model.eval()
    context = model_context(model)
    shapes = [s for s in CHECK_SHAPES if not context or s[1] <= context]
    vocab = model.config.vocab_size
    example = torch.randint(vocab, EXAMPLE_SHAPE, generator=torch.Generator().manual_seed(0))
    example = example.to(next(model.parameters()).device)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    started = time.perf_counter()
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                LogitsOnly(model), (example,), input_names=["input_ids"], output_names=["logits"],
                dynamic_shapes={"input_ids": {0: batch, 1: sequence}}, dynamo=True, opset_version=opset,
                verbose=False,
            )
            # external_data=None: weights go to model.onnx.data only past protobuf's 2 GB limit.
            program.save(str(path))
    except Exception as exc:
        _remove(path)
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise JobError(f"ONNX export failed ({type(exc).__name__}: {text}); skip it with --no-onnx") from exc
    seconds = time.perf_counter() - started
    check = check_against_torch(model, path, vocab, shapes)
    bad = [d for d in check["shapes"] if not d["max_abs_diff"] <= atol]
    if bad:
        _remove(path)
        detail = ", ".join(f"{'x'.join(map(str, d['shape']))}: {d.get('error') or format(d['max_abs_diff'], '.3g')}"
                           for d in bad)
        raise JobError(
            f"the ONNX model disagrees with PyTorch beyond atol {atol:g} ({detail}); it was not kept. "
            "Raise export.onnx_atol if the difference is acceptable, or skip ONNX with --no-onnx"
        )
    return {"file": path.name, "bytes": onnx_bytes(path), "seconds": seconds, "atol": atol, **check}


def quantize_int8(model: nn.Module, folder: Path) -> dict:
    """Write `folder/model.int8.onnx`: weights int8 per tensor, activations quantized on the fly."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder = Path(folder)
    source, path = folder / ONNX_NAME, folder / INT8_NAME
    started = time.perf_counter()
    try:
        with _quiet():
            quantize_dynamic(source, path, weight_type=QuantType.QInt8,
                             use_external_data_format=bool(_external_data(source)))
    except Exception as exc:
        _remove(path)
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise JobError(f"int8 quantization of the ONNX model failed ({text}); skip it with --no-int8") from exc
    seconds = time.perf_counter() - started
    # Quantization error is expected: it is measured and reported, never a failure.
    check = check_against_torch(model, path, model.config.vocab_size, CHECK_SHAPES[:2])
    if not np.isfinite(check["max_abs_diff"]):
        _remove(path)
        raise JobError("the int8 ONNX model produced non-finite logits; skip it with --no-int8")
    return {"file": path.name, "bytes": onnx_bytes(path), "seconds": seconds, **check}


def _remove(path: Path) -> None:
    for p in [path, *_external_data(path)]:
        p.unlink(missing_ok=True)


class OnnxCausalLM:
    """An ONNX model behind the small part of the PyTorch interface `perplexity()` uses."""

    def __init__(self, path: Path, config=None):
        self.path = Path(path)
        self.session = _session(self.path)
        names = [i.name for i in self.session.get_inputs()]
        if names != ["input_ids"] or "logits" not in [o.name for o in self.session.get_outputs()]:
            raise UsageError(
                f"{path} has inputs {names}; tapc evaluates ONNX models with one input 'input_ids' "
                "and an output 'logits', as `tapc export` writes them"
            )
        self.config = config
        self.training = False

    def __call__(self, input_ids, **_):
        logits = self.session.run(["logits"], {"input_ids": input_ids.cpu().numpy().astype(np.int64)})[0]
        return SimpleNamespace(logits=torch.from_numpy(logits))

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self
