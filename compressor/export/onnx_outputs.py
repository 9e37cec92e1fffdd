"""The ONNX folders of a run: the fp32 decoder checked against PyTorch, then its int8 and int4 copies
with their size, greedy text and (given an evaluation) quality."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import JobError
from ..evaluate import Evaluation
from ..folder import ONNX_NAME
from ..recipe import ExportConfig

QUANTIZED = {"int8": 8, "int4": 4}


def onnx_folders(kinds) -> list[str]:
    return ["onnx", *(f"onnx-{kind}" for kind in kinds)]


def write_onnx(model, tokenizer, model_dir: Path, out: Path, config: ExportConfig, evaluation: Evaluation | None,
               calibration: torch.Tensor | None, notify) -> dict:
    """`out/onnx/` checked against PyTorch, then `out/onnx-int8/` and `out/onnx-int4/` with their quality."""
    from ..generation import OnnxDecoder, TorchDecoder
    from .graph import export_decoder
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
    from .parity import check_greedy
    from .gptq import quantize_modules
    from .quantize import quantize_decoder

    bits = QUANTIZED[kind]
    notify({"stage": f"export-{kind}"})
    layers = {name: as_rows(module.weight.detach().float().cpu(), module)
              for name, module in prunable_weights(model).items()}
    calibrated, eight_bit = None, set()
    if bits == 4:
        eight_bit = last_layers(model, config.int4_int8_layers if config.int4_layout == "accurate" else 0.0)
        if calibration is not None and len(calibration):
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


def last_layers(model, fraction: float) -> set[str]:
    """Projection names in the last `fraction` of the decoder layers (at least one layer when fraction > 0)."""
    from ..calibration import decoder_layers
    from ..models import prunable_weights

    if fraction <= 0:
        return set()
    layers = decoder_layers(model)
    last = list(layers)[len(layers) - max(1, int(len(layers) * fraction)):]
    inside = {id(sub) for layer in last for sub in layer.modules()}
    return {name for name, module in prunable_weights(model).items() if id(module) in inside}
