"""`tapc report`, `tapc eval` and `tapc export` on saved outputs, through CliRunner."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import run_cli as run


@pytest.fixture(scope="module")
def two_four_run(tmp_path_factory, gpt2_dir, data_dir):
    """A compress run with the 2:4 pattern (dynamic schedule, regrowth, TA all on)."""
    folder = tmp_path_factory.mktemp("run24")
    recipe = folder / "tiny.yaml"
    recipe.write_text(
        "prune: {sparsity: 0.55, prune_every: 2, warmup: 0.1, tau: 0.2, final: 0.6}\n"
        "optim: {lr: 1.0e-3}\nta: {lr: 1.0e-2}\n"
        "train: {steps: 12, batch_size: 2, eval_every: 6, val_batches: 1}\n"
        "data: {seq_len: 32}\neval: {max_tokens: 600, batch_size: 4}\nexport: {onnx: false}\n"
    )
    out = folder / "out"
    result = run("compress", gpt2_dir, "--recipe", recipe, "--dataset", data_dir, "--out", out,
                 "--pattern", "2:4", "--json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_two_four_holds_after_compress_and_report_verifies_it(two_four_run):
    out, report = two_four_run
    assert report["recipe"]["prune"]["pattern"] == "2:4"
    log = json.loads((out / "training_log.json").read_text())
    assert len(log["mask_updates"]) > 1  # the dynamic schedule ran, not a one-shot mask: a count, set by the schedule
    # Independently: every group of 4 consecutive inputs (dim 0 of GPT-2's Conv1D) has <= 2 non-zeros.
    tensors = load_file(out / "model" / "model.safetensors")
    for layer in report["sparsity"]["layers"]:
        weight = tensors[layer["name"]]
        groups = (weight != 0).T.reshape(weight.shape[1], -1, 4).sum(-1)
        assert int(groups.max()) <= 2, layer["name"]  # a count of non-zeros, no rounding
    for folder in ("model", "sparse"):
        result = run("report", out / folder, "--json")
        assert result.exit_code == 0, result.output
        checked = json.loads(result.stdout)
        assert checked["pattern"] == {**checked["pattern"], "pattern": "2:4", "holds": True, "violating_groups": 0,
                                      "source": "recorded by the run"}
        assert checked["sparsity"]["layers"] == report["sparsity"]["layers"]
    text = run("report", out / "model")
    assert text.exit_code == 0 and "pattern 2:4" in text.stdout and "holds in every group" in text.stdout


def test_report_counts_zeros_itself_and_catches_a_broken_pattern(two_four_run, tmp_path):
    out, report = two_four_run
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for path in (out / "model").iterdir():
        (tampered / path.name).write_bytes(path.read_bytes())
    tensors = load_file(out / "model" / "model.safetensors")
    name = report["sparsity"]["layers"][0]["name"]
    tensors[name] = torch.ones_like(tensors[name])  # dense again, metadata still says 2:4 and 55%
    meta = {"format": "pt", "tapc.sparsity": "0.550000",
            "tapc.recipe": json.dumps(report["recipe"])}
    save_file(tensors, str(tampered / "model.safetensors"), metadata=meta)
    result = run("report", tampered, "--json")
    assert result.exit_code == 1
    assert "pattern 2:4 does not hold" in result.stderr and name in result.stderr
    checked = json.loads(result.stdout)
    assert checked["sparsity"]["layers"][0]["zeros"] == 0
    # Ratios of zero counts: one layer made dense takes its zeros out (measured 0.550 -> 0.465).
    assert checked["sparsity"]["prunable_sparsity"] < report["sparsity"]["prunable_sparsity"]


def test_report_on_unpruned_model_with_pattern_flag(gpt2_dir):
    result = run("report", gpt2_dir)
    assert result.exit_code == 0 and "global sparsity   0.0000%" in result.stdout
    result = run("report", gpt2_dir, "--pattern", "2:4")
    assert result.exit_code == 1 and "does not hold" in result.stderr
    assert run("report", gpt2_dir, "--pattern", "2/4").exit_code == 2
    assert run("report", "./nowhere").exit_code == 2


def test_eval_gives_the_compress_protocol_numbers(two_four_run, data_dir):
    out, report = two_four_run
    pruned = report["perplexity"]["pruned"]
    args = ["--dataset", data_dir, "--seq-len", pruned["seq_len"], "--eval-tokens", pruned["max_tokens"], "--json"]
    for folder in ("model", "sparse"):
        result = run("eval", out / folder, *args)
        assert result.exit_code == 0, result.output
        # The run's protocol, batches of 4, bit-exact weights (sparse too), same CPU: the same kernels, measured equal.
        assert json.loads(result.stdout)["perplexity"]["ppl"] == pytest.approx(pruned["ppl"], rel=1e-6)
    text = run("eval", out / "model", *args[:-1])
    assert text.exit_code == 0 and text.stdout.startswith("perplexity ")


def test_export_then_eval_and_generate_every_onnx_folder(two_four_run, data_dir):
    out, report = two_four_run
    assert not (out / "onnx").exists()
    pruned = report["perplexity"]["pruned"]
    protocol = ["--seq-len", pruned["seq_len"], "--eval-tokens", pruned["max_tokens"]]
    result = run("export", out / "model", "--no-sparse", "--dataset", data_dir, *protocol, "--json")
    assert result.exit_code == 0, result.output
    exported = json.loads(result.stdout)
    assert exported == json.loads((out / "export.json").read_text())
    assert exported["onnx"]["path"] == "onnx/model.onnx" and exported["onnx"]["logits"]["passed"]
    assert all(g["identical"] for g in exported["onnx"]["greedy"])
    # The same weights, windows and batches of 4 as the run's evaluation on the same CPU: measured equal.
    assert exported["perplexity"]["ppl"] == pytest.approx(pruned["ppl"], rel=1e-6)  # the model's own, same protocol
    for kind in ("int8", "int4"):
        assert (out / f"onnx-{kind}" / "genai_config.json").is_file()
        # Measured agreement 0.995-0.997 (int8), 0.991 (int4): a few of ~580 tokens move with rounding; bytes 0.48-0.51.
        assert exported[kind]["top1_agreement"] > 0.3 and exported[kind]["bytes"] < exported["onnx"]["bytes"]
    assert exported["int4"]["calibration_windows"] > 0  # GPTQ ran on the dataset's training text
    args = ["--dataset", data_dir, *protocol, "--json"]
    fp32 = json.loads(run("eval", out / "onnx", *args).stdout)["perplexity"]
    assert fp32["ppl"] == pytest.approx(pruned["ppl"], rel=1e-4)  # ORT's fp32 kernels vs PyTorch's: measured <= 1.4e-8
    for kind in ("int8", "int4"):  # `tapc eval` reproduces what the export measured
        measured = json.loads(run("eval", out / f"onnx-{kind}", *args).stdout)["perplexity"]
        assert measured == exported[kind]["perplexity"]
    texts = [run("generate", folder, "--prompt", "The history of", "--max-new-tokens", 12, "--ignore-eos")
             for folder in (out / "model", out / "onnx", out / "sparse")]
    assert all(t.exit_code == 0 for t in texts), [t.output for t in texts]
    assert texts[0].stdout == texts[1].stdout == texts[2].stdout and len(texts[0].stdout) > 1  # a character count
    assert "tokens/s" in texts[1].stderr
    again = run("export", out / "model", "--no-sparse")
    assert again.exit_code == 2 and "--overwrite" in again.stderr


def test_export_usage_errors(tmp_path, gpt2_dir):
    assert run("export", tmp_path / "missing").exit_code == 2
    result = run("export", gpt2_dir, "--no-onnx", "--no-sparse")
    assert result.exit_code == 2 and "nothing to export" in result.stderr
    result = run("eval", tmp_path / "missing.onnx")
    assert result.exit_code == 2 and "does not exist" in result.stderr
