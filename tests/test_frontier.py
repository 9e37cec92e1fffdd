"""The frontier benchmark's quality pass on tiny artifacts: chat KL for every artifact, KL where a run has none."""

from __future__ import annotations

import pytest
import torch

from benchmarks import frontier
from benchmarks.structured_peers import chat_answers
from compressor.export.graph import export_decoder
from compressor.models import load_model

from .conftest import build_model, save_tiny


def test_every_artifact_gets_a_chat_kl_and_a_missing_kl_is_measured(tmp_path, tokenizer):
    dense_dir = save_tiny(tmp_path / "dense", "llama", tokenizer, 0.2)
    dense = load_model(str(dense_dir)).model.eval()
    export_decoder(dense, dense_dir, tmp_path / "onnx")  # the same model through onnxruntime
    other = build_model("llama", len(tokenizer), 0.2)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    rows = [{"run": "dense", "artifact": "safetensors", "path": str(dense_dir), "ppl": None, "kl": 0.0,
             "top1": 1.0},
            {"run": "dense", "artifact": "onnx", "path": str(tmp_path / "onnx"), "kl": None},
            {"run": "other", "artifact": "safetensors", "path": str(tmp_path / "other"), "kl": None}]
    conversations = chat_answers(dense, tokenizer, tmp_path / "chat")
    assert (tmp_path / "chat" / "chat.json").is_file() and len(conversations) == 16
    test = torch.randint(len(tokenizer), (400,), generator=torch.Generator().manual_seed(0))
    frontier.measure_quality(rows, test, 64, 256, conversations)
    dense_row, onnx_row, other_row = rows
    assert dense_row["chat_kl"] == 0.0  # the same float32 computation twice
    # fp32 onnxruntime against fp32 PyTorch, the same weights: logits agree to ~1e-6, a KL of order 1e-12 (the
    # test-text KL is summed in float32: rounding of order 1e-9 either side of 0); halving one layer's MLP output
    # moves it by orders of magnitude more
    assert onnx_row["kl_measured_here"] and abs(onnx_row["kl"]) < 1e-6 and 0 <= onnx_row["chat_kl"] < 1e-6
    assert other_row["kl"] > 1e-4 and other_row["chat_kl"] > 1e-4
    assert "| dense | onnx |" in frontier.markdown([{**r, "sparsity": 0.0, "bytes": 1} for r in rows])


def test_chat_answers_of_another_model_are_refused(tmp_path, tokenizer):
    dense = load_model(str(save_tiny(tmp_path / "dense", "llama", tokenizer, 0.2))).model.eval()
    conversations = chat_answers(dense, tokenizer, tmp_path / "chat")
    assert chat_answers(dense, tokenizer, tmp_path / "chat") == conversations  # its own: read back
    torch.manual_seed(1)
    other = type(dense)(dense.config).eval()  # the same architecture, other weights
    with pytest.raises(SystemExit, match="another model's chat answers"):
        chat_answers(other, tokenizer, tmp_path / "chat")


def test_earlier_rows_join_after_the_dense_run_unless_measured_again():
    dense = [{"run": "dense", "artifact": a} for a in ("safetensors", "onnx")]
    new = [{"run": "structured-20 4x", "artifact": "onnx"}]
    earlier = [{"run": "dense", "artifact": "onnx", "decode_tps": 1.0}, {"run": "structured-20", "artifact": "onnx"},
               {"run": "structured-20 4x", "artifact": "onnx"}]
    rows = frontier.with_earlier(dense + new, earlier)
    assert [(r["run"], r.get("earlier", False)) for r in rows] == [
        ("dense", False), ("dense", False), ("structured-20", True), ("structured-20 4x", False)]
    speeds = {"dense": 1.0, "structured-20": 9.0, "structured-20 4x": 2.0}  # another session's machine: faster
    table = frontier.markdown([{**r, "sparsity": 0.0, "bytes": 1, "ppl": None, "kl": 0.0, "top1": None,
                                "decode_tps": speeds[r["run"]]} for r in rows])
    assert "| structured-20 † | onnx |" in table and "| structured-20 4x | onnx |" in table
    # bytes and KL hold across sessions, speeds do not: the earlier row is on the size front, not the speed front
    assert table.count("| size, speed |") == 1 and table.splitlines()[-2].endswith("| size |")


def test_speedups_divide_by_the_first_runs_file_of_the_same_format():
    rows = [{"run": "dense", "artifact": "onnx", "decode_tps": 40.0, "prefill_tps": 800.0},
            {"run": "dense", "artifact": "gguf-q8_0", "decode_tps": None, "prefill_tps": None},  # no llama-bench
            {"run": "cut", "artifact": "onnx", "decode_tps": 50.0, "prefill_tps": 1000.0},
            {"run": "cut", "artifact": "gguf-q8_0", "decode_tps": None, "prefill_tps": None},
            {"run": "cut", "artifact": "onnx-int4", "decode_tps": 90.0, "prefill_tps": 500.0}]  # no dense int4
    lines = frontier.speedups(rows).splitlines()[2:]
    assert lines == ["| dense | onnx | 40.0 | 800 | 1.000 | 1.000 |", "| dense | gguf-q8_0 | - | - | - | - |",
                     "| cut | onnx | 50.0 | 1000 | 1.250 | 1.250 |", "| cut | gguf-q8_0 | - | - | - | - |",
                     "| cut | onnx-int4 | 90.0 | 500 | - | - |"]
