"""The catalogue of bad input: each case exits non-zero with one line saying what is wrong
and how to fix it, and leaves no output directory (README: "Bad input")."""

from __future__ import annotations

import shutil
import struct

import pytest
import torch
from click.testing import CliRunner

from compressor.cli import cli

from .conftest import build_model


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _corrupt_copy(src, dst, cut):
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:cut])
    return dst


def _truncated_gguf(tmp):
    """A GGUF header (magic, version 3) announcing 5 tensors and 10 keys, then the file ends."""
    path = tmp / "cut.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 5, 10) + b"\x07\x00")
    return path


def _bert(tmp, tokenizer):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp / "bert")
    tokenizer.save_pretrained(tmp / "bert")
    return tmp / "bert"


def _short_data(tmp):
    for split in ("train", "validation", "test"):
        _write(tmp / "short" / f"{split}.txt", "a few words\n")
    return tmp / "short"


def _other_model_checkpoint(tmp, gpt2_dir, data_dir, recipe):
    """The checkpoint an interrupted run of another model left at the same --out."""
    from compressor import checkpoint, compress, load_recipe
    from compressor.train import Interrupted

    other = tmp / "other-model"
    shutil.copytree(gpt2_dir, other)
    model = build_model("gpt2", 320)
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)
    model.save_pretrained(other)
    polls = iter(range(100))
    with pytest.raises(Interrupted):
        compress(str(other), load_recipe(recipe, {"data.dataset": str(data_dir)}), tmp / "out",
                 stop=lambda: next(polls) == 1)
    assert (checkpoint.checkpoint_dir(tmp / "out") / "checkpoint.pt").exists()


# (id, extra CLI args, setup(tmp, fixtures) -> overrides of MODEL/--dataset, expected exit, message)
CASES = [
    ("sparsity-too-high", ["--sparsity", "1.0"], None, 2, "1.0"),
    ("sparsity-negative", ["--sparsity", "-0.2"], None, 2, "-0.2"),
    ("sparsity-not-a-number", ["--sparsity", "thirty"], None, 2, "thirty"),
    ("steps-zero", ["--steps", "0"], None, 2, "--steps 0"),
    ("seq-len-beyond-context", ["--seq-len", "4096"], None, 2, "exceeds the model's context of 128"),
    ("calibration-beyond-context", [],
     lambda t, f: {"recipe": str(_write(t / "r.yaml", "prune: {calibration_len: 4096}\n"))}, 2,
     "prune.calibration_len 4096 exceeds the model's context of 128"),
    ("unknown-device", ["--device", "abacus"], None, 2, "unknown device"),
    ("missing-model-path", [], lambda t, f: {"model": "./no/such/dir"}, 2, "does not exist"),
    ("missing-gguf", [], lambda t, f: {"model": str(t / "absent.gguf")}, 2, "does not exist"),
    ("corrupt-gguf", [], lambda t, f: {"model": str(_write(t / "bad.gguf", "not a gguf file"))}, 2,
     "could not read model"),
    ("truncated-gguf", [], lambda t, f: {"model": str(_truncated_gguf(t))}, 2, "could not read model"),
    ("hub-id-offline", [], lambda t, f: {"model": "gpt2"}, 2, "Hugging Face Hub"),
    ("truncated-safetensors", [], lambda t, f: {"model": str(_corrupt_copy(f["gpt2_dir"], t / "cut", 200))}, 2,
     "could not read model"),
    ("not-a-causal-lm", [], lambda t, f: {"model": str(_bert(t, f["tokenizer"]))}, 2, "not a causal language model"),
    ("recipe-unknown-key", [], lambda t, f: {"recipe": str(_write(t / "r.yaml", "prune: {sparsty: 0.3}\n"))}, 2,
     "prune.sparsty: unknown key"),
    ("recipe-wrong-type", [], lambda t, f: {"recipe": str(_write(t / "r.yaml", "train: {steps: many}\n"))}, 2,
     "train.steps"),
    ("recipe-impossible-schedule", [],
     lambda t, f: {"recipe": str(_write(t / "r.yaml", "prune: {warmup: 0.8, final: 0.5}\n"))}, 2,
     "must be after prune.warmup"),
    ("recipe-missing", [], lambda t, f: {"recipe": "missing.yaml"}, 2, "recipe 'missing.yaml' not found"),
    ("dataset-missing", [], lambda t, f: {"dataset": str(t / "nowhere")}, 2, "not found"),
    ("dataset-without-train", [], lambda t, f: {"dataset": str(_write(t / "d" / "test.txt", "x\n").parent)}, 2,
     "no train.txt"),
    ("dataset-empty", [],
     lambda t, f: {"dataset": str((_write(t / "e" / "train.txt", "\n"), _write(t / "e" / "test.txt", "x"))[0].parent)},
     2, "train text is empty"),
    ("dataset-shorter-than-a-window", [], lambda t, f: {"dataset": str(_short_data(t))}, 2, "less than one window"),
    ("output-not-writable", [], lambda t, f: {"out": str(_write(t / "a-file", "x") / "out")}, 2, "cannot write output"),
    ("output-exists", [], lambda t, f: {"out": str(_write(t / "out" / "x.txt", "x").parent)}, 2, "--overwrite"),
    ("resume-without-checkpoint", ["--resume"], None, 2, "no checkpoint to resume"),
    ("resume-other-model", ["--resume"],
     lambda t, f: _other_model_checkpoint(t, f["gpt2_dir"], f["data_dir"], f["recipe"]) or {}, 2,
     "written for another model"),
    ("max-ppl-not-positive", ["--max-ppl", "0"], None, 2, "--max-ppl"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, tmp_path, gpt2_dir, data_dir, quick_recipe_file, tokenizer):
    name, extra, setup, code, message = case
    fixtures = {"gpt2_dir": gpt2_dir, "data_dir": data_dir, "tokenizer": tokenizer, "recipe": quick_recipe_file}
    args = {"model": str(gpt2_dir), "recipe": str(quick_recipe_file), "dataset": str(data_dir),
            "out": str(tmp_path / "out")}
    args.update(setup(tmp_path, fixtures) if setup else {})
    before = {p.name for p in tmp_path.iterdir()}
    result = CliRunner().invoke(cli, ["compress", args["model"], "--recipe", args["recipe"], "--dataset",
                                      args["dataset"], "--out", args["out"], *extra])
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.strip().splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.output
    created = {p.name for p in tmp_path.iterdir()} - before
    assert not any(n == "out" or n.startswith(".out.partial") for n in created), created


def test_catalogue_is_long_enough():
    assert len(CASES) >= 20


def test_quality_gates_fail_with_their_own_code_after_writing_the_report(gpt2_dir, data_dir, quick_recipe_file,
                                                                           tmp_path):
    base = ["compress", str(gpt2_dir), "--recipe", str(quick_recipe_file), "--dataset", str(data_dir), "--steps", "3"]
    result = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "gated"), "--max-ppl", "1.5"])
    assert result.exit_code == 3, result.output
    assert "quality gate failed" in result.stderr and (tmp_path / "gated" / "report.json").exists()
    result = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "ok"), "--max-ppl-increase", "100000",
                                      "--max-ppl", "1e9", "--json"])
    assert result.exit_code == 0, result.output
    import json

    report = json.loads(result.stdout)
    assert report["schema_version"] == 1 and report["gates"]["passed"] and report["gates"]["max_ppl"] == 1e9
