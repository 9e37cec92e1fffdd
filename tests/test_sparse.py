"""The compact sparse artifact: bit-exact round trip, the size bound, and loading it as a model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from compressor.sparse import write_sparse
from compressor.models import load_model, prunable_weights
from compressor.pruner import Pruner
from compressor.recipe import PruneConfig
from compressor.sparse import FILENAME, is_sparse, load_sparse, save_sparse

from .conftest import build_model


def _pruned(shape, sparsity, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen)
    weight[torch.rand(shape, generator=gen) < sparsity] = 0.0
    return weight


def _bits(tensor):
    return tensor.view(torch.int32) if tensor.dtype == torch.float32 else tensor.view(torch.int16)


def test_round_trip_is_bit_exact(tmp_path):
    weight = _pruned((48, 40), 0.5)
    weight[0, :2] = torch.tensor([float("inf"), float("nan")])  # odd values survive too
    tensors = {"a.weight": weight, "b.weight": _pruned((16, 24), 0.3).to(torch.bfloat16),
               "odd.weight": _pruned((7, 13), 0.6), "emb.weight": torch.randn(30, 8), "bias": torch.randn(8)}
    pruned = ["a.weight", "b.weight", "odd.weight"]
    save_sparse(tensors, pruned, tmp_path / FILENAME)
    assert is_sparse(tmp_path) and not is_sparse(tmp_path / "missing")
    restored = load_sparse(tmp_path)
    assert set(restored) == set(tensors)
    for name, tensor in tensors.items():
        assert restored[name].dtype == tensor.dtype and restored[name].shape == tensor.shape
        assert torch.equal(_bits(restored[name]), _bits(tensor)), name
    stored = load_file(tmp_path / FILENAME)
    assert stored["a.weight.compressed"].numel() == int((weight != 0).sum())
    assert "a.weight" not in stored and stored["a.weight.bitmask"].dtype == torch.uint8


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_pruned_tensors_meet_the_size_bound(tmp_path, sparsity):
    tensors = {f"l{i}.weight": _pruned((256, 512), sparsity, seed=i) for i in range(4)}
    sizes = save_sparse(tensors, list(tensors), tmp_path / FILENAME)
    actual = sum(int((t == 0).sum()) for t in tensors.values()) / sum(t.numel() for t in tensors.values())
    # Byte counts, no float sums: 4 B a kept value, 1/32 for the bitmask, 16 B of shape; measured 0.0100 under it.
    assert sizes["pruned_ratio"] <= (1 - actual) + 1 / 32 + 0.01
    # File bytes (the same counts plus the header): measured 19.8 kB under the bound; the CPU plays no part.
    assert (tmp_path / FILENAME).stat().st_size <= (1 - actual + 1 / 32 + 0.01) * 4 * 4 * 256 * 512


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_sparse_folder_loads_as_the_same_model(tmp_path, tokenizer, kind):
    model = build_model(kind, len(tokenizer))
    pruner = Pruner(PruneConfig(sparsity=0.5, saliency="magnitude", final=0.5), 2).prepare(model)
    pruner.step(1)
    pruner.finalize()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    pruned = [f"{n}.weight" for n in prunable_weights(model)]
    info = write_sparse(tmp_path / "model", tmp_path / "sparse", pruned)
    # Byte counts: measured 0.65-0.71 of the dense file, pruned ratio 0.532 against a bound of 0.541.
    assert info["bytes"] < info["dense_bytes"] and info["pruned_ratio"] <= info["pruned_ratio_bound"]
    assert info["pruned_sparsity"] == pytest.approx(0.5, abs=1e-4)  # counts: round(0.5 n) zeros of n, exactly 0.5 here
    loaded = load_model(str(tmp_path / "sparse"))
    assert loaded.source["kind"] == "sparse"
    reference = dict(model.named_parameters())
    for name, param in loaded.model.named_parameters():
        assert torch.equal(param, reference[name]), name
    ids = torch.randint(len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_negative_zero_counts_as_zero(tmp_path):
    weight = torch.tensor([[-0.0, 1.5, 0.0, -2.0]])
    save_sparse({"w": weight}, ["w"], tmp_path / FILENAME)
    restored = load_sparse(tmp_path)["w"]
    assert torch.equal(restored, weight) and restored[0, 0].sign() == 0
    assert load_file(tmp_path / FILENAME)["w.compressed"].tolist() == [1.5, -2.0]


def test_pruner_writes_positive_zeros(tokenizer):
    model = build_model("llama", len(tokenizer))
    pruner = Pruner(PruneConfig(sparsity=0.5, saliency="magnitude", final=0.5), 2).prepare(model)
    pruner.step(1)
    pruner.finalize()
    for module in prunable_weights(model).values():
        zeros = module.weight[module.weight == 0]
        # A count (half the weights are masked), then the bits of every zero.
        assert zeros.numel() > 0 and torch.equal(zeros.view(torch.int32), torch.zeros_like(zeros, dtype=torch.int32))


def test_corrupt_bitmask_is_an_error(tmp_path):
    from safetensors.torch import save_file

    save_sparse({"w": _pruned((8, 16), 0.5)}, ["w"], tmp_path / FILENAME)
    stored = load_file(tmp_path / FILENAME)
    stored["w.bitmask"] = torch.full_like(stored["w.bitmask"], 255)
    save_file(stored, str(tmp_path / FILENAME), metadata={"format": "pt", "tapc.format": "tapc-sparse-bitmask"})
    with pytest.raises(ValueError, match="bitmask marks 128 weights"):
        load_sparse(tmp_path)
