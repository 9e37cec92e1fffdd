"""Sparsity accounting, the run report, and `tapc report` on any saved model.

Zeros are always counted from the tensors themselves, never taken from metadata.
`inspect_checkpoint` counts them in the weight files; which tensors are projections
comes from the architecture (the model built on the meta device), and metadata only
says which pattern a run claimed, a claim checked against the tensors.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import UsageError
from .sparse import FILENAME as SPARSE_FILE
from .sparse import is_sparse, load_sparse
from .patterns import Pattern, input_dim, parse_pattern, violations


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
        *([structure_line(report["structure"])] if report.get("structure") else []),
        f"perplexity        dense {dense['ppl']:.3f} -> pruned {pruned['ppl']:.3f} "
        f"({pruned['tokens']:,} tokens; {pruned['protocol']})",
        *([f"drift             KL(dense || pruned) {pruned['kl']:.4f} nats/token, top-1 agreement "
           f"{pruned['agreement']:.2%} with the dense model"] if pruned.get("kl") is not None else []),
        f"training          {report['train']['steps']} steps, {report['train']['tokens']:,} tokens, "
        f"{report['train']['seconds']:.1f} s, loss {report['recipe']['train'].get('loss', 'ce')}; "
        f"total {report['seconds']:.1f} s",
        f"output            {report['output']}",
    ]
    files = report.get("files")
    if files:
        lines.append(f"read              {', '.join([files['report'], *files['plots'].values()])} in the output")
    return "\n".join(lines)


def structure_line(structure: dict) -> str:
    """What a structured run cut out: the widths and the parameters before and after."""
    names = {"mlp": "MLP channels", "heads": "query heads"}
    widths = ", ".join(f"{names[kind]} {w['before']} -> {w['after']}" for kind, w in structure["widths"].items())
    params = structure["parameters"]
    return (f"cut               {widths} in every layer; {params['before']:,} -> {params['after']:,} parameters "
            f"({params['after'] / params['before']:.1%})")


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


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], str, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if is_sparse(path):
        return load_sparse(path), "sparse", _metadata(path / SPARSE_FILE)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{path} holds no *.safetensors weights; give a model directory written by tapc or save_pretrained")
    tensors, meta = {}, {}
    for file in files:
        tensors.update(load_file(str(file)))
        with safe_open(str(file), framework="pt") as fh:
            meta.update(fh.metadata() or {})
    return tensors, "safetensors", meta


def _read_gguf(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, int], int]:
    """A GGUF as transformers dequantizes it: its tensors by Hugging Face name, the projections' input dims, bytes."""
    from .models import load_model, prunable_weights

    model = load_model(str(path)).model
    dims = {f"{name}.weight": input_dim(module) for name, module in prunable_weights(model).items()}
    return dict(model.state_dict()), dims, path.stat().st_size


def _metadata(file: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        return dict(fh.metadata() or {})


def _projections(folder: Path) -> dict[str, int]:
    """{weight name: input dim} of the projections, from the architecture alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import prunable_weights

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{folder} has no readable config.json ({str(exc).splitlines()[0][:120]}); give a model directory") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {f"{name}.weight": input_dim(module) for name, module in prunable_weights(model).items()}


def inspect_checkpoint(spec: str, pattern: str | None = None) -> dict:
    """Per-layer sparsity counted from the files, and whether an N:M pattern holds.

    `pattern` is checked if given; otherwise the pattern the run recorded (if any).
    """
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        tensors, dims, size = _read_gguf(path)
        kind, meta = "gguf", {}
    elif not path.is_dir():
        raise UsageError(f"{spec} is not a model directory or .gguf file; give OUT/model, OUT/sparse or a GGUF")
    else:
        tensors, kind, meta = _read_tensors(path)
        dims, size = _projections(path), sum(p.stat().st_size for p in path.glob("*.safetensors"))
    missing = [name for name in dims if name not in tensors]
    if missing:
        raise UsageError(f"{spec} lacks the weight {missing[0]} that its config.json implies; is the folder complete?")
    names = list(dims)
    report = {"path": str(path), "format": kind, "sparsity": sparsity_summary(tensors, names), "bytes": size}
    claimed = None
    if meta.get("tapc.recipe"):
        claimed = json.loads(meta["tapc.recipe"]).get("prune", {}).get("pattern")
    chosen = pattern or claimed
    if chosen:
        try:
            parsed: Pattern = parse_pattern(chosen)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if parsed.structured:
            per_layer = {n: violations(tensors[n], dims[n], parsed) for n in names}
            bad = sum(v[0] for v in per_layer.values())
            report["pattern"] = {
                "pattern": str(parsed), "source": "--pattern" if pattern else "recorded by the run",
                "violating_groups": bad, "groups": sum(v[1] for v in per_layer.values()), "holds": bad == 0,
                "violating_layers": [n for n, v in per_layer.items() if v[0]],
            }
    return report
