"""GGUF export: llama.cpp's layout, read back by transformers' GGUF loader, zeros and logits kept."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from transformers import AutoTokenizer

from compressor.folder import save_model
from compressor.export.gguf import read_back, write_gguf
from compressor.models import load_model
from compressor.pruner import Pruner
from compressor.recipe import PruneConfig

from .conftest import build_model, run_cli


def tiny(kind: str, vocab: int):
    """A tiny model in a shape transformers' GGUF loader rebuilds exactly: GPT-2 with the default 1024 positions
    (it reads llama.cpp's context length into n_ctx only), Gemma-3 with 6 layers so that its every-6th-layer
    global attention (what llama.cpp assumes) is the config's own."""
    from transformers import AutoModelForCausalLM

    model = build_model(kind, vocab, init_range=0.2)
    changes = {"gpt2": {"n_positions": 1024}, "gemma3": {"num_hidden_layers": 6, "layer_types": None}}.get(kind)
    if changes:
        torch.manual_seed(0)
        config = type(model.config)(**{**model.config.to_dict(), **changes})
        model = AutoModelForCausalLM.from_config(config).eval()
    pruner = Pruner(PruneConfig(sparsity=0.5, saliency="magnitude", final=0.5), 2).prepare(model)
    pruner.step(1)
    pruner.finalize()
    return model


def pruned_names(model) -> list[str]:
    from compressor.models import prunable_weights

    return [f"{name}.weight" for name in prunable_weights(model)]


def saved_tiny(kind: str, folder, tokenizer):
    model = tiny(kind, len(tokenizer))
    save_model(model, tokenizer, folder / "model", {})
    return kind, model, folder


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma3"])
def saved(request, tmp_path_factory, tokenizer):
    return saved_tiny(request.param, tmp_path_factory.mktemp(f"gguf-{request.param}"), tokenizer)


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_written_file_reads_back_as_the_same_model(saved, tokenizer, kind):
    arch, model, folder = saved
    path = folder / f"model-{kind}.gguf"
    info = write_gguf(model, tokenizer, folder / "model", path, kind)
    assert path.is_file() and not list(folder.glob(".*partial*"))
    assert info["architecture"] == arch and info["bytes"] == path.stat().st_size
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == arch
    loaded, check = read_back(path, model, pruned_names(model))
    # Zero is on the grid of both types: every pruned weight reads back as exactly 0.
    assert check["zeros_kept"] == 1.0
    ids = torch.randint(len(tokenizer), (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    scale = float(expected.abs().max())
    # f16 keeps ~3 significant digits per weight, q8_0 ~2; logits of these random models move far less than this.
    # That error is the weights' rounding, fixed by the file (elementwise numpy); fp32 sum order adds ~1e-6 x scale.
    bound = {"f16": 0.02, "q8_0": 0.15}[kind] * scale
    assert float((got - expected).abs().max()) <= bound  # measured 0.06-0.17% (f16), 1.5-5.8% (q8_0) of scale
    assert check["max_abs_logit_diff"] <= bound  # its own sequence: 0.06-0.30% (f16), 0.9-3.5% (q8_0) of scale
    # The file's tokenizer encodes text as the model's own does.
    text = "The history of the city, in 1776 , was short."
    assert load_model(str(path)).tokenizer.encode(text) == AutoTokenizer.from_pretrained(folder / "model").encode(text)


def test_sentencepiece_style_vocabulary_reads_back_the_same(tmp_path, data_dir):
    """A BPE with byte fallback (Gemma's, Llama 2's kind) goes in as llama.cpp's `llama` vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"<0x{i:02X}>" for i in range(256))]
    tok.train_from_iterator([(data_dir / "train.txt").read_text()],
                            trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False))
    spm = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    _, model, folder = saved_tiny("gemma3", tmp_path, spm)
    path = tmp_path / "m.gguf"
    write_gguf(model, spm, folder / "model", path, "f16")
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.token_type"].contents()[4] == gguf.TokenType.BYTE
    text = (data_dir / "test.txt").read_text()[:2000] + " héllo wörld 😀"  # the emoji only encodes as bytes
    assert load_model(str(path)).tokenizer.encode(text) == spm.encode(text)


def test_llama_attention_rows_are_in_llama_cpp_order(tokenizer, tmp_path):
    _, model, folder = saved_tiny("llama", tmp_path, tokenizer)
    path = tmp_path / "m.gguf"
    write_gguf(model, tokenizer, folder / "model", path, "f32")
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}["blk.0.attn_q.weight"]
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    heads, half = model.config.num_attention_heads, q.shape[0] // model.config.num_attention_heads // 2
    # llama.cpp interleaves each head's two rotary halves: row 2i is HF's row i, row 2i+1 is HF's row half+i.
    data = stored.data.reshape(q.shape)
    assert (data[0] == q[0]).all() and (data[1] == q[half]).all() and (data[2] == q[1]).all()
    assert heads * 2 * half == q.shape[0]


def test_four_bit_file_keeps_the_lm_head_at_eight_bits(tokenizer, tmp_path):
    _, model, folder = saved_tiny("llama", tmp_path, tokenizer)
    path = tmp_path / "m.gguf"
    info = write_gguf(model, tokenizer, folder / "model", path, "q4_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["output.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q4_0"
    assert types["token_embd.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert info["tensor_types"]["Q8_0"] == 1
    _, check = read_back(path, model, pruned_names(model))
    assert check["zeros_kept"] == 1.0  # zero is on Q4_0's grid too


def test_compress_from_a_gguf_keeps_its_metadata_and_tokenizer(tmp_path, tokenizer, data_dir, quick_recipe_file):
    source_dir = tmp_path / "src"
    model = build_model("llama", len(tokenizer))
    save_model(model, tokenizer, source_dir, {})
    source = tmp_path / "input.gguf"
    write_gguf(model, tokenizer, source_dir, source, "f16")
    out = tmp_path / "out"
    result = run_cli("compress", source, "--recipe", quick_recipe_file, "--dataset", data_dir, "--out", out,
                     "--gguf", "q8_0", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    info = report["export"]["gguf"]["q8_0"]
    assert info["metadata"] == "copied from input.gguf" and info["zeros_kept"] == 1.0
    # q8_0 weights moved PPL by 1.1e-4 relative (measured): 5% is 400x that; fp32 summation order adds ~1e-7.
    assert info["perplexity"]["ppl"] == pytest.approx(report["perplexity"]["pruned"]["ppl"], rel=0.05)
    before, after = gguf.GGUFReader(source).fields, gguf.GGUFReader(out / "gguf" / "model-q8_0.gguf").fields
    changed = {"general.file_type"}
    assert set(before) == set(after)
    for key in set(before) - changed - {"GGUF.tensor_count", "GGUF.kv_count", "GGUF.version"}:
        assert before[key].contents() == after[key].contents(), key
    assert after["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert "gguf/model-q8_0.gguf" in (out / "report.md").read_text()


def test_export_gguf_alone_writes_only_the_gguf(tokenizer, tmp_path):
    _, _, folder = saved_tiny("gpt2", tmp_path, tokenizer)
    out = tmp_path / "exp"
    (out / "onnx").mkdir(parents=True)
    (out / "onnx" / "model.onnx").write_text("an earlier export, left alone")
    result = run_cli("export", folder / "model", "--out", out, "--gguf", "q8_0,f16")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "gguf").iterdir()) == ["model-f16.gguf", "model-q8_0.gguf"]
    assert not (out / "sparse").exists() and (out / "onnx" / "model.onnx").read_text().startswith("an earlier")
    exported = json.loads((out / "export.json").read_text())
    assert exported["gguf"]["q8_0"]["zeros_kept"] == 1.0
    assert "gguf q8_0" in result.output
    # `tapc report` counts the same zeros in the GGUF as in the safetensors model.
    reports = [run_cli("report", path, "--json") for path in (folder / "model", out / "gguf" / "model-q8_0.gguf")]
    assert all(r.exit_code == 0 for r in reports), reports[1].output
    safetensors, from_gguf = (json.loads(r.stdout)["sparsity"] for r in reports)
    assert from_gguf["prunable_zeros"] == safetensors["prunable_zeros"] > 0  # counts of exact zeros


def test_unsupported_architecture_exits_2_and_writes_nothing(tmp_path, tokenizer, data_dir, quick_recipe_file):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    save_model(Qwen2ForCausalLM(config), tokenizer, tmp_path / "qwen", {})
    result = run_cli("export", tmp_path / "qwen", "--out", tmp_path / "exp", "--gguf", "q8_0")
    assert result.exit_code == 2
    assert "GGUF export supports Llama" in result.output and "Qwen2ForCausalLM" in result.output
    assert not (tmp_path / "exp").exists()
    # Inside compress it fails before any training, with nothing written.
    result = run_cli("compress", tmp_path / "qwen", "--recipe", quick_recipe_file, "--dataset", data_dir,
                     "--out", tmp_path / "out", "--gguf", "f16")
    assert result.exit_code == 2 and "GGUF export supports" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["q4_k", "q8_0,q8_0"])
def test_bad_gguf_types_exit_2(tmp_path, value):
    result = run_cli("export", tmp_path, "--gguf", value)
    assert result.exit_code == 2 and "GGUF types" in result.output
