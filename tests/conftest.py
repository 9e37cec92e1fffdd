"""Fixtures: tiny GPT-2 and Llama models built from configs, a tokenizer trained on
local text, and a small local dataset. Nothing here touches the network."""

from __future__ import annotations

import os
from pathlib import Path

# Set before transformers / huggingface_hub are imported anywhere: they read these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TAPC_DATA_DIR") or REPO.parent / "shared" / "data" / "wikitext2-local")


@pytest.fixture(autouse=True)
def offline_and_isolated(tmp_path, monkeypatch):
    """No network, no user caches, outputs in a temporary directory."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("TAPC_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)


def _lines(split: str, count: int) -> str:
    text = (SHARED_DATA / f"{split}.txt").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines(keepends=True) if line.strip()]
    return "".join(lines[:count])


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A small local dataset in the layout `--dataset DIR` reads."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "train.txt").write_text(_lines("train", 120))
    (folder / "validation.txt").write_text(_lines("validation", 20))
    (folder / "test.txt").write_text(_lines("test", 30))
    return folder


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, data_dir):
    """A byte-level BPE tokenizer (vocab 320) trained on the fixture text."""
    from compressor.testing import bpe_tokenizer

    texts = [(data_dir / f"{s}.txt").read_text() for s in ("train", "validation", "test")]
    return bpe_tokenizer(texts, roles=("eos", "bos", "pad"))


def build_model(kind: str, vocab_size: int, init_range: float = 0.02):
    """A 2-layer model from a config. A larger `init_range` gives a random model sharper
    next-token choices (GPT-2 at 0.02 predicts the same token everywhere)."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=64, n_layer=2, n_head=2,
                            bos_token_id=0, eos_token_id=0, initializer_range=init_range)
        return GPT2LMHeadModel(config).eval()
    if kind == "gemma3":  # one sliding-window layer (window 16) and one global one
        config = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=128, sliding_window=16,
                                  layer_types=["sliding_attention", "full_attention"], bos_token_id=0,
                                  eos_token_id=0, pad_token_id=0, initializer_range=init_range)
        return Gemma3ForCausalLM(config).eval()
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, initializer_range=init_range)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def no_dropout_model(tmp_path, tokenizer):
    """A tiny GPT-2 with dropout off, so runs in 1 and 2 processes differ only by the order of sums."""
    model = build_model("gpt2", len(tokenizer))
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def model_dir(request, tmp_path_factory, tokenizer) -> Path:
    """A tiny model saved in Hugging Face layout (safetensors + tokenizer)."""
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    build_model(request.param, len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny(folder: Path, kind: str, tokenizer, init_range: float = 0.02) -> Path:
    """A tiny model saved in Hugging Face layout (safetensors + tokenizer) in `folder`."""
    build_model(kind, len(tokenizer), init_range).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-gpt2-only")
    build_model("gpt2", len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def quick_recipe_file(tmp_path) -> Path:
    """A recipe small enough for a tiny model to run in seconds."""
    path = tmp_path / "tiny.yaml"
    path.write_text(
        "name: tiny\n"
        "prune: {sparsity: 0.5, prune_every: 2, warmup: 0.1, tau: 0.2, final: 0.6}\n"
        "optim: {lr: 1.0e-3}\n"
        "ta: {lr: 1.0e-2}\n"
        "train: {steps: 12, batch_size: 2, eval_every: 6, val_batches: 1}\n"
        "data: {seq_len: 32}\n"
        "eval: {max_tokens: 600, batch_size: 4}\n"
        # ONNX export takes ~10 s even for a tiny model; the tests that need it turn it on.
        "export: {onnx: false}\n"
    )
    return path


def run_cli(*args):
    """`tapc ARGS...` through CliRunner (arguments may be paths or numbers)."""
    from click.testing import CliRunner

    from compressor.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])
