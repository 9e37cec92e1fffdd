"""The ONNX decoder with a KV cache, written by a library picked by architecture.

- **onnxruntime-genai's model builder** (`onnxruntime_genai.models.builder`, used as a
  library) writes the graph for the architectures it supports (`BUILDER_ARCHITECTURES`:
  Llama/SmolLM2, Mistral, Qwen, Phi, Gemma 1-3): onnxruntime's fused kernels
  (GroupQueryAttention with rotary embeddings, skip RMS norms, fused QKV) and its own
  `genai_config.json`. Sliding-window layers get a full-length cache
  (`windowed_kv_cache=false`), so every layer's cache has one layout.
- **transformers' ONNX exporter** (`transformers.exporters.OnnxExporter`: torch.onnx's
  dynamo export with a `DynamicCache`, onnxruntime CPU fusions) writes it for every other
  causal LM, GPT-2 among them. tapc renames its inputs and outputs to onnxruntime-genai's
  names with onnx_ir and writes a `genai_config.json` of type `decoder`, which
  onnxruntime-genai runs as it is.

Either way the folder holds `model.onnx` (+ `model.onnx.data`), `genai_config.json`, and
the model's config and tokenizer, and the graph maps `input_ids`, `attention_mask`
(`position_ids` where the graph has it) and `past_key_values.N.key/value` (batch x
kv heads x past length x head size) to `logits` and `present.N.key/value`, with batch,
sequence and past length dynamic.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import JobError
from ..folder import GENAI_CONFIG, ONNX_NAME, copy_side_files, onnx_bytes

BUILDER_ARCHITECTURES = {
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "PhiForCausalLM",
    "Phi3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
}


@contextlib.contextmanager
def quiet():
    """The exporters print, log and warn freely; the library prints nothing (STYLE.md)."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # their ERROR lines too: a failure reaches the caller as an exception
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield sink
    finally:
        logging.disable(previous)


def architecture(model: nn.Module) -> str:
    names = getattr(model.config, "architectures", None) or [type(model).__name__]
    return names[0]


def export_decoder(model: nn.Module, model_dir: Path, folder: Path, *, exporter: str = "auto") -> dict:
    """Write the KV-cache decoder of `model` (saved in `model_dir`) into `folder`.

    `exporter`: `auto` (the builder where it supports the architecture, else
    transformers), `builder` or `transformers`. A builder failure falls back to
    transformers and is recorded under `builder_error`. Raises `JobError` if no
    exporter succeeds.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    info: dict = {}
    use_builder = exporter == "builder" or (exporter == "auto" and architecture(model) in BUILDER_ARCHITECTURES)
    if use_builder:
        try:
            info["exporter"] = build_with_genai(Path(model_dir), folder)
            _exact_embedding_scale(model, folder / ONNX_NAME)
        except Exception as exc:  # an unsupported config surfaces as many exception types
            if exporter == "builder":
                raise JobError(f"onnxruntime-genai's builder failed ({_one_line(exc)}); try exporter "
                               "'transformers' or skip ONNX with --no-onnx") from exc
            info["builder_error"] = _one_line(exc)
            _clear(folder)
    if "exporter" not in info:
        try:
            info["exporter"] = _export_with_transformers(model, folder)
        except Exception as exc:
            _clear(folder)
            raise JobError(f"ONNX export failed ({_one_line(exc)}); skip it with --no-onnx") from exc
    copy_side_files(Path(model_dir), folder)
    path = folder / ONNX_NAME
    return {"file": ONNX_NAME, "bytes": onnx_bytes(path), "seconds": time.perf_counter() - started, **info}


def _one_line(exc: Exception) -> str:
    return (f"{type(exc).__name__}: " + " ".join(str(exc).split()))[:240]


def _clear(folder: Path) -> None:
    for path in folder.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def build_with_genai(model_dir: Path, folder: Path, precision: str = "fp32") -> str:
    """A CPU graph from onnxruntime-genai's model builder, used as a library, with its defaults otherwise.

    tapc builds fp32 and quantizes it itself (quantize.py); the edge benchmark builds the
    builder's own int4 as the reference to compare with.
    """
    import onnxruntime_genai
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    with tempfile.TemporaryDirectory(prefix="tapc-builder-") as cache, quiet():
        options = parse_extra_options(None, str(model_dir), str(folder), precision, "cpu", cache,
                                      ["windowed_kv_cache=false", "hf_token=false"])
        _adapt_config(options["hf_details"]["hf_config"])
        create_model(None, str(model_dir), str(folder), precision, "cpu", cache, **options)
    return f"onnxruntime-genai {onnxruntime_genai.__version__} model builder"


def _exact_embedding_scale(model: nn.Module, path: Path) -> None:
    """Scale the embeddings by the model's own factor: the builder rounds Gemma's sqrt(hidden) to 2 decimals.

    sqrt(640) = 25.298 becomes 25.30, a relative error of 7e-5: the likely cause of
    Gemma-3-270M's ONNX logits sitting 0.09 from PyTorch's, 250 times PyTorch's own fp32
    error (a width-48 Gemma-3: 2.4e-3 before, 2.6e-6 after). The builder's Mul node gets a
    constant of its own with transformers' fp32 value.
    """
    import onnx

    scale = getattr(model.get_input_embeddings(), "embed_scale", None)
    if scale is None:
        return
    graph_model = onnx.load(str(path), load_external_data=False)
    mul = next((n for n in graph_model.graph.node if n.name == "/model/embed_tokens/Mul"), None)
    if mul is None:
        raise JobError("the builder's graph has no /model/embed_tokens/Mul to scale the embeddings with")
    name = "/model/embed_tokens/exact_scale"
    value = onnx.numpy_helper.from_array(scale.detach().float().cpu().numpy(), name)
    graph_model.graph.node.insert(0, onnx.helper.make_node("Constant", [], [name], name=name, value=value))
    mul.input[1] = name
    onnx.save(graph_model, str(path))


def _adapt_config(config) -> None:
    """transformers 5 keeps Gemma-3's RoPE settings per layer type; the builder reads the flat 4.x fields."""
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope and "sliding_attention" in rope:
        config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
        config.rope_theta = rope["full_attention"]["rope_theta"]
        config.rope_parameters = dict(rope["full_attention"])


def _export_with_transformers(model: nn.Module, folder: Path) -> str:
    """transformers' dynamo ONNX exporter with a cache; names and genai_config.json for onnxruntime-genai."""
    import onnx_ir as ir
    import transformers
    from transformers import DynamicCache
    from transformers.exporters import OnnxConfig, OnnxExporter

    model = model.eval()
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    # Sizes of 2 or more everywhere: torch.export specializes a size-1 example into a constant.
    ids = torch.randint(vocab, (2, 8), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        cache = model(input_ids=ids[:, :5], cache=DynamicCache(), use_cache=True).cache
    sample = {"input_ids": ids[:, 5:], "attention_mask": torch.ones_like(ids),
              "position_ids": torch.arange(5, 8, device=device).expand(2, 3), "past_key_values": cache}
    with quiet(), torch.no_grad():
        exported = OnnxExporter().export(model, sample, config=OnnxConfig(dynamic=True, ort_fusions="cpu"))
    graph = exported.program
    layers = set()
    for value in [*graph.graph.inputs, *graph.graph.outputs]:
        value.name, layer = _genai_name(value.name)
        if layer is not None:
            layers.add(layer)
    ir.save(graph, str(folder / ONNX_NAME), external_data=f"{ONNX_NAME}.data")
    inputs = [v.name for v in graph.graph.inputs]
    _write_genai_config(model.config, folder, len(layers), kv_heads=cache.layers[0].keys.shape[1],
                        head_size=cache.layers[0].keys.shape[3], position_ids="position_ids" in inputs)
    return f"transformers {transformers.__version__} OnnxExporter (torch.onnx dynamo, onnxruntime CPU fusions)"


def _genai_name(name: str) -> tuple[str, int | None]:
    """transformers' cache names (`past_key_values.layers.0.keys`, `cache.layers.0.keys`) -> genai's."""
    match = re.fullmatch(r"(?:input\.)?past_key_values\.layers\.(\d+)\.(key|value)s", name)
    if match:
        return f"past_key_values.{match[1]}.{match[2]}", int(match[1])
    match = re.fullmatch(r"(?:output\.)?cache\.layers\.(\d+)\.(key|value)s", name)
    if match:
        return f"present.{match[1]}.{match[2]}", int(match[1])
    return name, None


def _write_genai_config(config, folder: Path, layers: int, *, kv_heads: int, head_size: int,
                        position_ids: bool) -> None:
    """The genai_config.json onnxruntime-genai needs to run a `decoder` graph with these names."""
    from ..models import model_context

    context = model_context(config) or 2048
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    if position_ids:
        inputs["position_ids"] = "position_ids"
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    eos = config.eos_token_id
    genai = {
        "model": {
            "type": "decoder",
            "bos_token_id": config.bos_token_id, "eos_token_id": eos,
            "pad_token_id": config.pad_token_id if config.pad_token_id is not None else
            (eos[0] if isinstance(eos, list) else eos),
            "context_length": context, "vocab_size": config.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": ONNX_NAME, "head_size": head_size, "hidden_size": config.hidden_size,
                "num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_hidden_layers": layers,
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 50, "top_p": 1.0},
    }
    (folder / GENAI_CONFIG).write_text(json.dumps(genai, indent=2) + "\n")
