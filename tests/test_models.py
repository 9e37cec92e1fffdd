"""Loading checkpoints safely, and the errors a user sees when it cannot be done."""

from __future__ import annotations

import time

import pytest
import torch

from compressor.errors import UsageError
from compressor.models import load_model, prunable_weights

from .conftest import build_model


def test_local_directory_loads_float32(model_dir):
    loaded = load_model(str(model_dir))
    assert loaded.source["kind"] == "directory"
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.source["sha256"]  # file hashes are recorded for the report


def test_gpt2_conv1d_projections_are_prunable():
    names = list(prunable_weights(build_model("gpt2", 97)))
    assert names == [f"transformer.h.{i}.{m}" for i in range(2)
                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def test_hub_id_offline_fails_with_clear_message():
    start = time.perf_counter()
    with pytest.raises(UsageError, match="could not load 'gpt2' from the Hugging Face Hub") as info:
        load_model("gpt2")
    assert "local model directory" in str(info.value) and "\n" not in str(info.value)
    assert time.perf_counter() - start < 30


def test_missing_path():
    with pytest.raises(UsageError, match="does not exist"):
        load_model("./no/such/model")
    with pytest.raises(UsageError, match="does not exist"):
        load_model("missing.gguf")


def test_pickle_refused_without_opt_in(tmp_path, gpt2_dir):
    model = build_model("gpt2", 97)
    folder = tmp_path / "pickled"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(UsageError, match="--allow-pickle"):
        load_model(str(folder))


def test_truncated_safetensors(tmp_path, gpt2_dir):
    folder = tmp_path / "broken"
    folder.mkdir()
    for path in gpt2_dir.iterdir():
        data = path.read_bytes()
        (folder / path.name).write_bytes(data[: len(data) // 2] if path.suffix == ".safetensors" else data)
    with pytest.raises(UsageError, match="could not read model"):
        load_model(str(folder))


def test_not_a_causal_lm(tmp_path, tokenizer):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(UsageError, match="not a causal language model"):
        load_model(str(folder))
