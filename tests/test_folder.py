"""Saved models reload with identical logits and the reported perplexity; outputs are whole or absent."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compressor import compress, load_recipe
from compressor.data import load_texts, tokenize
from compressor.evaluate import perplexity
from compressor.folder import read_metadata, save_model, staged_output
from compressor.pruner import Pruner
from compressor.recipe import PruneConfig

from .conftest import build_model


def test_saved_model_reloads_with_identical_logits(tmp_path, tokenizer):
    model = build_model("llama", len(tokenizer))
    pruner = Pruner(PruneConfig(sparsity=0.5, saliency="magnitude", final=0.5), 2).prepare(model)
    pruner.step(1)
    pruner.finalize()
    save_model(model, tokenizer, tmp_path / "m", {"tapc.sparsity": "0.5"})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.randint(len(tokenizer), (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    assert read_metadata(tmp_path / "m")["tapc.sparsity"] == "0.5"
    assert read_metadata(tmp_path / "m")["format"] == "pt"


def test_compress_output_reloads_to_reported_perplexity(gpt2_dir, data_dir, quick_recipe_file, tmp_path):
    recipe = load_recipe(quick_recipe_file, {"data.dataset": str(data_dir)})
    result = compress(str(gpt2_dir), recipe, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out" / "model")
    test = tokenize(tok, load_texts(str(data_dir)).texts["test"])
    ppl = perplexity(model, test, recipe.eval.seq_len or recipe.data.seq_len, max_tokens=recipe.eval.max_tokens)
    # The run's protocol, weights and batches of 4 on the same CPU: measured equal; an ulp in the logits moves it ~1e-7.
    assert ppl.ppl == pytest.approx(result.report["perplexity"]["pruned"]["ppl"], rel=1e-6)
    meta = read_metadata(tmp_path / "out" / "model")
    # A ratio of integer counts, written with 6 decimals: at most 5e-7 off, whatever the CPU.
    assert float(meta["tapc.sparsity"]) == pytest.approx(result.report["sparsity"]["prunable_sparsity"], abs=1e-6)
    assert json.loads(meta["tapc.recipe"])["prune"]["sparsity"] == 0.5
    log = json.loads((tmp_path / "out" / "training_log.json").read_text())
    assert len(log["loss"]) == recipe.train.steps and log["mask_updates"]


def test_staged_output_is_whole_or_absent(tmp_path):
    out = tmp_path / "result"
    with pytest.raises(RuntimeError):
        with staged_output(out, overwrite=False) as stage:
            (stage / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with staged_output(out, overwrite=False) as stage:
        (stage / "done.txt").write_text("x")
    assert (out / "done.txt").exists()
