"""The KV-cache ONNX decoder against PyTorch: logits with a non-empty cache, greedy text, onnxruntime-genai."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from compressor.errors import JobError
from compressor.export.graph import export_decoder
from compressor.export.parity import check_greedy, check_logits, greedy_failures, prompt_ids
from compressor.generation import OnnxDecoder, TorchDecoder, generate

from .conftest import save_tiny

# GPT-2 goes through transformers' exporter, Llama and Gemma-3 (one sliding-window layer) through the builder.
KINDS = {"gpt2": "transformers", "llama": "onnxruntime-genai", "gemma3": "onnxruntime-genai"}
INIT = {"gpt2": 0.2, "llama": 0.2, "gemma3": 0.02}  # random weights whose greedy text varies


@pytest.fixture(scope="module", params=list(KINDS))
def exported(request, tmp_path_factory, tokenizer):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp(f"kv-{request.param}")
    model_dir = save_tiny(root / "model", request.param, tokenizer, INIT[request.param])
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    info = export_decoder(model, model_dir, root / "onnx")
    return request.param, model, root / "onnx", info


def test_graph_has_genai_names_and_dynamic_axes(exported):
    kind, model, folder, info = exported
    assert info["exporter"].startswith(KINDS[kind]) and "builder_error" not in info
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    layers = model.config.num_hidden_layers
    for n in range(layers):
        for part in ("key", "value"):
            assert f"past_key_values.{n}.{part}" in inputs and f"present.{n}.{part}" in outputs
            shape = inputs[f"past_key_values.{n}.{part}"]
            assert isinstance(shape[0], str) and isinstance(shape[2], str)  # batch and past length dynamic
    assert {"input_ids", "attention_mask"} <= set(inputs) and outputs[0] == "logits"
    assert all(isinstance(d, str) for d in inputs["input_ids"])
    genai = json.loads((folder / "genai_config.json").read_text())["model"]
    assert genai["decoder"]["num_hidden_layers"] == layers and genai["decoder"]["filename"] == "model.onnx"
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()


def test_logits_match_torch_with_a_cache(exported):
    kind, model, folder, _ = exported
    result = check_logits(model, OnnxDecoder(folder / "model.onnx"))
    assert [(c["batch"], c["prefill"], c["decode_steps"]) for c in result["cases"]] == [(1, 5, 3), (3, 17, 2), (2, 40, 2)]
    # Decode steps read a cache of up to 41 tokens: past Gemma-3's sliding window of 16.
    # The parity check's own verdict, with a margin of ~100 (fp32 rounding here is ~1e-5 on any CPU).
    assert result["passed"] and result["worst_fraction_of_tolerance"] < 0.05, result


def test_greedy_text_is_identical_to_torch(exported, tokenizer):
    kind, model, folder, _ = exported
    results = check_greedy(TorchDecoder(model), OnnxDecoder(folder / "model.onnx"), prompt_ids(tokenizer), tokenizer)
    assert len(results) == 3 and all(r["identical"] for r in results), results
    assert greedy_failures(results, tolerance=1e-3) == []
    tokens = {t for ids in prompt_ids(tokenizer) for t in generate(TorchDecoder(model), ids, 32).tokens}
    assert len(tokens) > 5  # a real test: the continuations are not one token repeated


def test_onnxruntime_genai_runs_the_export(exported, tokenizer):
    og = pytest.importorskip("onnxruntime_genai")
    kind, model, folder, _ = exported
    prompt = prompt_ids(tokenizer)[1]
    genai = og.Model(str(folder))
    params = og.GeneratorParams(genai)
    params.set_search_options(max_length=len(prompt) + 16, do_sample=False)
    generator = og.Generator(genai, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    reference = generate(TorchDecoder(model), prompt, 16).tokens
    eos = model.config.eos_token_id
    stop = reference.index(eos) + 1 if eos in reference else len(reference)  # genai stops at EOS
    assert tokens == reference[:stop]


def test_builder_failure_falls_back_to_transformers(tmp_path, tokenizer, monkeypatch):
    from compressor.export import graph

    def broken(*args, **kwargs):
        raise KeyError("rope_type")

    monkeypatch.setattr(graph, "build_with_genai", broken)
    model_dir = save_tiny(tmp_path / "model", "llama", tokenizer)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    info = export_decoder(model, model_dir, tmp_path / "onnx")
    assert info["exporter"].startswith("transformers") and "rope_type" in info["builder_error"]
    assert check_logits(model, OnnxDecoder(tmp_path / "onnx" / "model.onnx"), cases=((2, 6, 2),))["passed"]
    with pytest.raises(JobError, match="builder failed"):
        export_decoder(model, model_dir, tmp_path / "again", exporter="builder")


def test_greedy_divergence_is_a_failure_only_beyond_a_tie():
    tie = {"identical": False, "margin": 1e-4}
    real = {"identical": False, "margin": 0.5}
    assert greedy_failures([{"identical": True}, tie, real], tolerance=1e-3) == [real]


def test_sampling_with_a_seed_repeats_and_differs_from_greedy(exported, tokenizer):
    from compressor.generation import Sampling

    _, model, folder, _ = exported
    prompt = prompt_ids(tokenizer)[2]
    torch_run = generate(TorchDecoder(model), prompt, 20, sampling=Sampling(temperature=1.5, top_k=50, seed=3))
    onnx_run = generate(OnnxDecoder(folder / "model.onnx"), prompt, 20, sampling=Sampling(temperature=1.5, top_k=50, seed=3))
    greedy = generate(TorchDecoder(model), prompt, 20)
    assert torch_run.tokens == onnx_run.tokens  # same logits, same seed: same draws
    assert torch_run.tokens != greedy.tokens
