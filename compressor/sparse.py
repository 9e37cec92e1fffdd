"""A compact safetensors layout for pruned weights: the non-zero values plus a bitmask.

A masked safetensors file still stores every zero, so pruning does not make it
smaller. Here each pruned tensor `W` becomes three tensors (the layout idea of
compressed-tensors' "sparse-bitmask"):

    W.compressed   the kept values, in row-major order, original dtype
    W.bitmask      uint8, one bit per weight (1 = kept), little-endian bits, packed per row
    W.shape        int64, the dense shape

Every other tensor is stored as it is. A 1-bit mask costs 1/32 of a float32 weight,
so a tensor at sparsity s takes about (1 - s) + 1/32 of its dense bytes.

Both +0.0 and -0.0 count as zero and come back as +0.0 (w * mask leaves -0.0 behind
every negative masked weight, about half of them; keeping those would double the
values stored). tapc's pruner writes +0.0, so its outputs round-trip bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .folder import copy_side_files

FORMAT = "tapc-sparse-bitmask"
FILENAME = "model.sparse.safetensors"
# The 1-bit mask costs 1/32 of a float32 weight; 1% covers shapes and row padding.
SIZE_SLACK = 1 / 32 + 0.01


def compress_tensor(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    rows = tensor.reshape(tensor.shape[0], -1) if tensor.dim() > 1 else tensor.reshape(1, -1)
    kept = rows != 0  # NaN counts as kept
    bits = np.packbits(kept.numpy(), axis=1, bitorder="little")
    return {
        "compressed": rows[kept].clone(),
        "bitmask": torch.from_numpy(bits),
        "shape": torch.tensor(list(tensor.shape), dtype=torch.int64),
    }


def decompress_tensor(compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    dims = [int(d) for d in shape.tolist()]
    cols = int(np.prod(dims[1:])) if len(dims) > 1 else dims[0]
    kept = np.unpackbits(bitmask.numpy(), axis=1, count=cols, bitorder="little").astype(bool)
    kept = torch.from_numpy(kept)
    if int(kept.sum()) != compressed.numel():
        raise ValueError(f"bitmask marks {int(kept.sum())} weights but {compressed.numel()} values are stored")
    dense = torch.zeros(kept.shape, dtype=compressed.dtype)
    dense[kept] = compressed
    return dense.reshape(dims)


def save_sparse(tensors: dict[str, torch.Tensor], pruned: list[str], path: Path,
                metadata: dict[str, str] | None = None) -> dict:
    """Write `tensors` to `path`, the ones named in `pruned` compressed; return the sizes."""
    out: dict[str, torch.Tensor] = {}
    dense_bytes = stored_bytes = 0
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        if name in pruned:
            parts = compress_tensor(tensor)
            out.update({f"{name}.{key}": value for key, value in parts.items()})
            dense_bytes += tensor.numel() * tensor.element_size()
            stored_bytes += sum(v.numel() * v.element_size() for v in parts.values())
        else:
            out[name] = tensor
    meta = {**(metadata or {}), "format": "pt", "tapc.format": FORMAT, "tapc.compressed": json.dumps(sorted(pruned))}
    save_file(out, str(path), metadata=meta)
    return {"pruned_dense_bytes": dense_bytes, "pruned_stored_bytes": stored_bytes,
            "pruned_ratio": stored_bytes / dense_bytes if dense_bytes else 1.0}


def is_sparse(path: Path) -> bool:
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as fh:
        return (fh.metadata() or {}).get("tapc.format") == FORMAT


def load_sparse(path: Path) -> dict[str, torch.Tensor]:
    """The dense tensors, exactly as they were saved: `{name: tensor}`."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    with safe_open(str(path), framework="pt") as fh:
        raw = {key: fh.get_tensor(key) for key in fh.keys()}
    # Find compressed tensors by their parts rather than by metadata, which could be stale.
    compressed = {key[: -len(".bitmask")] for key in raw if key.endswith(".bitmask")}
    dense = {}
    for key, value in raw.items():
        base, _, part = key.rpartition(".")
        if base in compressed and part in ("compressed", "bitmask", "shape"):
            if part == "compressed":
                dense[base] = decompress_tensor(value, raw[f"{base}.bitmask"], raw[f"{base}.shape"])
        else:
            dense[key] = value
    return dense


def load_sparse_model(folder: Path):
    """The causal LM saved in `folder` (config + sparse file), with its exact dense weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    tensors = load_sparse(folder)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    state = model.state_dict()
    loaded = {state[name].data_ptr() for name in tensors if name in state}
    # Tied weights (GPT-2's lm_head = wte) are saved once; anything else missing is an error.
    untied = [name for name in missing if state[name].data_ptr() not in loaded]
    if unexpected or untied:
        raise ValueError(f"{folder} does not match its config: missing {untied[:3]}, unexpected {unexpected[:3]}")
    return model.float().eval()


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
    copy_side_files(Path(model_dir), folder)
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
