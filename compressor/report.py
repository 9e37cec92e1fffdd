"""Sparsity accounting and the run report.

Zeros are always counted from the tensors themselves, never taken from metadata.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class LayerSparsity:
    name: str
    shape: list[int]
    params: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "sparsity": self.sparsity}


def layer_sparsity(tensors: dict[str, torch.Tensor], names: list[str]) -> list[LayerSparsity]:
    """Per-tensor zero counts for the weights in `names` (in that order)."""
    return [
        LayerSparsity(n, list(tensors[n].shape), tensors[n].numel(), int((tensors[n] == 0).sum()))
        for n in names
    ]


def sparsity_summary(tensors: dict[str, torch.Tensor], pruned: list[str]) -> dict:
    """Per-layer and global sparsity: over the pruned weights and over all parameters."""
    layers = layer_sparsity(tensors, pruned)
    pruned_params = sum(layer.params for layer in layers)
    pruned_zeros = sum(layer.zeros for layer in layers)
    all_params = sum(t.numel() for t in tensors.values())
    all_zeros = sum(int((t == 0).sum()) for t in tensors.values())
    return {
        "layers": [layer.to_dict() for layer in layers],
        "prunable_params": pruned_params,
        "prunable_zeros": pruned_zeros,
        "prunable_sparsity": pruned_zeros / pruned_params if pruned_params else 0.0,
        "total_params": all_params,
        "total_zeros": all_zeros,
        "total_sparsity": all_zeros / all_params if all_params else 0.0,
        "nonzero_params": all_params - all_zeros,
    }


def model_tensors(model) -> dict[str, torch.Tensor]:
    """Parameters by their weight names (`layer.weight`), each shared tensor once."""
    seen, out = set(), {}
    for name, param in model.named_parameters(remove_duplicate=True):
        if id(param) not in seen:
            seen.add(id(param))
            out[name] = param.detach()
    return out


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


def format_table(report: dict) -> str:
    """The report as plain text: the per-layer table, then the summary lines."""
    sp = report["sparsity"]
    lines = layer_table(sp)
    dense, pruned = report["perplexity"]["dense"], report["perplexity"]["pruned"]
    lines += [
        "",
        f"global sparsity   {sp['prunable_sparsity']:.4%} of {sp['prunable_params']:,} prunable weights "
        f"(target {report['recipe']['prune']['sparsity']:.2%}); {sp['total_sparsity']:.2%} of all "
        f"{sp['total_params']:,} parameters",
        f"perplexity        dense {dense['ppl']:.3f} -> pruned {pruned['ppl']:.3f} "
        f"({pruned['tokens']:,} tokens; {pruned['protocol']})",
        f"training          {report['train']['steps']} steps, {report['train']['tokens']:,} tokens, "
        f"{report['train']['seconds']:.1f} s; total {report['seconds']:.1f} s",
        f"output            {report['output']}",
    ]
    files = report.get("files")
    if files:
        lines.append(f"read              {', '.join([files['report'], *files['plots'].values()])} in the output")
    return "\n".join(lines)


def layer_table(sp: dict) -> list[str]:
    """The per-layer rows of a `sparsity_summary`, with a header."""
    width = max([len(layer["name"]) for layer in sp["layers"]] + [5])
    lines = [f"{'layer':<{width}}  {'shape':>12}  {'params':>10}  {'zeros':>10}  {'sparsity':>8}"]
    for layer in sp["layers"]:
        shape = "x".join(str(s) for s in layer["shape"])
        lines.append(
            f"{layer['name']:<{width}}  {shape:>12}  {layer['params']:>10,}  {layer['zeros']:>10,}  "
            f"{layer['sparsity']:>8.2%}"
        )
    return lines
