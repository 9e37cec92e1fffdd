"""One line per exported artifact, for the text output of `tapc compress` and `tapc export`."""

from __future__ import annotations

from .onnx_outputs import QUANTIZED


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
