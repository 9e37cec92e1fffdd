"""OUT/gguf/model-TYPE.gguf: the model for llama.cpp, Ollama and LM Studio.

Written with the `gguf` package (llama.cpp's own Python writer) the way llama.cpp's
`convert_hf_to_gguf.py` writes these architectures:

- **Tensors** under llama.cpp's names (`gguf.get_tensor_name_map`), with its layouts:
  Llama's Q/K rows permuted back to interleaved rotary pairs, GPT-2's Conv1D weights
  transposed to [out, in], Gemma-3's RMSNorm weights stored as 1 + w. 1-D tensors
  (norms, biases) stay F32; a matrix whose rows do not fill whole quantization blocks
  is written F16 (as llama.cpp does).
- **Metadata and tokenizer**: when the model came from a `.gguf` (the run records
  its path and sha256 in the safetensors metadata), that file's keys are copied as
  they are (tokenizer, chat template, names, licence) and only the tensors and the
  file type change. Otherwise they are built from config.json and the tokenizer:
  byte-level BPE as `gpt2` (tokens, merges, the pre-tokenizer llama.cpp knows by the
  hash of a test string's tokens, else `default`), SentencePiece-style BPE with byte
  fallback as `llama` (scores from the merge order, which is what llama.cpp merges by).
- **Checked by reading it back** with transformers' GGUF loader, the path `tapc eval`
  uses: logits against the PyTorch model, and whether pruned weights are still zero
  (exact for f16, bf16, q8_0, q4_0 and q5_0, whose grids hold zero; not for q4_1 and
  q5_1, whose offset grids round a zero to the block minimum plus a multiple of the step).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import JobError, UsageError
from ..recipe import GGUF_TYPES as TYPES

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Gemma3ForCausalLM": "gemma3", "GPT2LMHeadModel": "gpt2"}
SUPPORTED = "Llama (SmolLM2, Llama 2/3 without rope scaling), Gemma-3 (text) and GPT-2"
SOURCE_KEY = "tapc.source"  # safetensors metadata: the model the run started from
# The LM head (token_embd when tied) at 8 bits in the 4- and 5-bit files, as llama.cpp's llama-quantize keeps it
# above the rest and as tapc's int4 ONNX does: on SmolLM2 a 4-bit head cost more than all projections together.
_HEAD_8BIT = ("q4_0", "q4_1", "q5_0", "q5_1")

# llama.cpp names a byte-level BPE pre-tokenizer by the sha256 of the token ids of this text
# (convert_hf_to_gguf.py, get_vocab_base_pre); the names below are the ones it defines.
_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_TOKENIZERS = {
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
}


def gguf_architecture(model) -> str:
    """llama.cpp's name for the model's architecture, or a UsageError naming the supported ones."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise UsageError(f"GGUF export supports {SUPPORTED}; this model is a {name}. Export ONNX instead, "
                         "or drop --gguf")
    arch, config = ARCHITECTURES[name], model.config
    scaling = _rope(config).get("rope_type", "default")
    if arch == "llama" and scaling != "default":
        raise UsageError(f"GGUF export does not support {scaling!r} rope scaling yet (this model has it); "
                         "export ONNX instead, or drop --gguf")
    if arch == "gemma3" and list(config.layer_types) != _gemma3_layers(config.num_hidden_layers):
        # llama.cpp (and transformers' GGUF loader) place global attention on every 6th layer, whatever the file says
        raise UsageError("this Gemma-3 model does not put full attention on every 6th layer, which llama.cpp "
                         "assumes; it cannot be exported to GGUF. Export ONNX instead, or drop --gguf")
    return arch


def _gemma3_layers(count: int) -> list[str]:
    return ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(count)]


def check_type(kind: str) -> str:
    if kind not in TYPES:
        raise UsageError(f"unknown GGUF type {kind!r}; give one of {', '.join(TYPES)}")
    return kind


def source_metadata(loaded_source: dict) -> dict[str, str]:
    """The safetensors metadata that lets a later export find the `.gguf` the model came from."""
    if loaded_source.get("kind") != "gguf":
        return {}
    return {SOURCE_KEY: json.dumps({k: loaded_source[k] for k in ("kind", "path", "sha256")})}


def base_file(metadata: dict[str, str]) -> Path | None:
    """The source `.gguf` recorded in a saved model's metadata, if it is still there unchanged."""
    try:
        source = json.loads(metadata.get(SOURCE_KEY, "{}"))
    except ValueError:
        return None
    path = Path(source.get("path", ""))
    if source.get("kind") != "gguf" or not path.is_file():
        return None
    from ..models import _sha256

    return path if _sha256(path) == source.get("sha256") else None


def write_gguf(model, tokenizer, model_dir: Path, path: Path, kind: str, *, base: Path | None = None) -> dict:
    """Write `path` (atomically) as a GGUF of `kind`; returns what was written.

    `model_dir` is the saved model (its tokenizer files feed the vocabulary when there
    is no `base`); `base`, a `.gguf` whose metadata and tokenizer are copied unchanged.
    """
    import gguf

    arch = gguf_architecture(model)
    qtype = gguf.GGMLQuantizationType[check_type(kind).upper()]
    tensors = dict(_tensors(model, arch))
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(partial, arch)
    try:
        if base is not None:
            _copy_metadata(writer, base, arch, set(tensors), _shapes(model.config, arch))
        else:
            _metadata(writer, model.config, arch)
            _vocabulary(writer, tokenizer, Path(model_dir), model.config.vocab_size)
        writer.add_file_type(_file_type(gguf, kind))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        types: dict[str, int] = {}
        head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
        for name, data in tensors.items():
            eight = name == head and kind in _HEAD_8BIT
            stored = _stored_type(gguf, gguf.GGMLQuantizationType.Q8_0 if eight else qtype, data)
            types[stored.name] = types.get(stored.name, 0) + 1
            if stored == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(name, data)
            elif stored == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(name, data.astype(np.float16))
            else:
                writer.add_tensor(name, gguf.quants.quantize(data, stored), raw_dtype=stored)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return {"type": kind, "architecture": arch, "bytes": path.stat().st_size, "tensor_types": types,
            "metadata": "copied from " + base.name if base is not None else "built from config.json and the tokenizer"}


def _stored_type(gguf, qtype, data: np.ndarray):
    """F32 for 1-D tensors, F16 for a matrix whose rows do not fill whole blocks of `qtype`, else `qtype`."""
    if data.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if data.shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _file_type(gguf, kind: str) -> int:
    return gguf.LlamaFileType.ALL_F32 if kind == "f32" else gguf.LlamaFileType[f"MOSTLY_{kind.upper()}"]


def _rope(config) -> dict:
    """The rope parameters of the global-attention layers (transformers 5 keeps them per layer type)."""
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("full_attention", params)


def _tensors(model, arch: str):
    """(llama.cpp name, float32 array in llama.cpp's layout) for every tensor llama.cpp loads."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the output layer from token_embd when output.weight is absent
        stem, _, suffix = hf_name.rpartition(".")
        name = names.get_name(stem)
        if name is None:
            raise JobError(f"GGUF export has no llama.cpp name for tensor {hf_name}; this {type(model).__name__} "
                           "differs from the layout tapc knows")
        data = tensor.detach().float().cpu().numpy()
        if arch == "llama" and suffix == "weight" and stem.endswith(("q_proj", "k_proj")):
            heads = config.num_attention_heads if stem.endswith("q_proj") else config.num_key_value_heads
            data = _interleave_rope(data, heads)
        elif arch == "gpt2" and suffix == "weight" and stem.endswith(("c_attn", "c_proj", "c_fc")):
            data = data.T  # Conv1D keeps [in, out]; llama.cpp wants [out, in] like a Linear
        elif arch == "gemma3" and stem.endswith("norm"):
            data = data + 1.0  # Gemma3RMSNorm multiplies by (1 + w); llama.cpp by the stored weight
        yield f"{name}.{suffix}", np.ascontiguousarray(data, dtype=np.float32)


def _interleave_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half row order -> llama.cpp's interleaved pairs (convert_hf_to_gguf's `permute`)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _shapes(config, arch: str) -> dict[str, int]:
    """The widths llama.cpp reads, from the config: a structured run's cut model has smaller ones than
    the GGUF it came from."""
    if arch == "gpt2":
        return {f"{arch}.feed_forward_length": config.n_inner or 4 * config.n_embd,
                f"{arch}.attention.head_count": config.n_head}
    shapes = {f"{arch}.feed_forward_length": config.intermediate_size,
              f"{arch}.attention.head_count": config.num_attention_heads,
              f"{arch}.attention.head_count_kv": config.num_key_value_heads}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim != config.hidden_size // config.num_attention_heads:  # else llama.cpp infers it
        shapes.update({f"{arch}.attention.key_length": head_dim, f"{arch}.attention.value_length": head_dim})
    return shapes


def _copy_metadata(writer, base: Path, arch: str, tensor_names: set[str], shapes: dict[str, int]) -> None:
    """Every key of `base` except the file type (set by the caller), with the model's own `shapes` where
    they differ (in place, so an unchanged model's file is the same) or are missing; its tensors must be
    ours by name."""
    import gguf

    reader = gguf.GGUFReader(base)
    theirs = reader.fields["general.architecture"].contents()
    if theirs != arch:
        raise UsageError(f"{base} is a {theirs} GGUF but the model is {arch}; give the GGUF this model came from, "
                         "or none")
    missing = {t.name for t in reader.tensors} ^ tensor_names
    if missing:
        raise UsageError(f"the model's tensors do not match those of {base.name} (e.g. {sorted(missing)[0]}); "
                         "give the GGUF this model came from, or none")
    skip = {"general.architecture", "general.file_type", "general.quantization_version"}
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in skip:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, shapes.get(field.name, field.contents()), vtype, sub_type=sub)
    for name, value in shapes.items():
        if name not in reader.fields:
            writer.add_key_value(name, value, gguf.GGUFValueType.UINT32)


def _metadata(writer, config, arch: str) -> None:
    """The hyperparameters llama.cpp reads for `arch`, from a transformers config."""
    source = Path(getattr(config, "_name_or_path", "") or "model")
    writer.add_name(source.parent.name if source.name == "model" and source.parent.name else source.name)
    writer.add_block_count(config.num_hidden_layers)
    if arch == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(_rope(config).get("rope_theta", 10000.0)))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
        return
    writer.add_sliding_window(config.sliding_window)  # gemma3
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    scaling = _rope(config)
    if scaling.get("rope_type") == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])


def _vocabulary(writer, tokenizer, model_dir: Path, vocab_size: int) -> None:
    """Tokens, types, scores or merges, special ids and the chat template, as llama.cpp's converter writes them."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UsageError(f"GGUF export handles BPE tokenizers; this one is {model.get('type')}. Export ONNX instead")
    vocab = tokenizer.get_vocab()
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    size = max(vocab_size, len(vocab))
    tokens, types = [], []
    for i in range(size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token) and model.get("byte_fallback"):
            tokens.append(token)
            types.append(gguf.TokenType.BYTE)  # even when listed as added tokens, as llama.cpp's converter does
        elif i in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.UNKNOWN if token == model.get("unk_token") else gguf.TokenType.NORMAL)
    if model.get("byte_fallback"):  # SentencePiece-style: llama.cpp merges the pair whose result scores highest
        rank = {"".join(_pair(m)): r for r, m in enumerate(model.get("merges") or [])}
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores([-float(rank.get(t, len(rank) + i)) for i, t in enumerate(tokens)])
        writer.add_token_types(types)
        writer.add_add_space_prefix(_adds_space_prefix(spec))
        _special(gguf.SpecialVocab(model_dir, n_vocab=len(tokens)), tokenizer).add_to_gguf(writer, quiet=True)
        return
    digest = hashlib.sha256(str(tokenizer.encode(_CHECK_TEXT)).encode()).hexdigest()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_PRE_TOKENIZERS.get(digest, "default"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    _special(special, tokenizer).add_to_gguf(writer, quiet=True)


def _special(special, tokenizer):
    """Say whether BOS / EOS are added as the tokenizer itself does, where its config files do not say."""
    ids = tokenizer("a")["input_ids"]
    for kind, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id)):
        at = ids[:1] if kind == "bos" else ids[-1:]
        special.add_special_token.setdefault(kind, token_id is not None and at == [token_id])
    return special


def _pair(merge) -> tuple[str, str]:
    return tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge)


def _adds_space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts a space before the text (Llama 2's SentencePiece does, Gemma's does not)."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"Prepend"' in text or re.search(r'"prepend_scheme": "(first|always)"', text) is not None


def read_back(path: Path, model, pruned: list[str]) -> tuple[object, dict]:
    """Load `path` with transformers' GGUF loader; the loaded model and how it compares with `model`.

    `zeros_kept`: the fraction of `model`'s zero weights in the pruned tensors that are
    still exactly zero; `max_abs_logit_diff`: on one fixed random sequence.
    """
    from ..models import load_model

    loaded = load_model(str(path)).model
    ours, theirs = model.state_dict(), loaded.state_dict()
    zeros = kept = 0
    for name in pruned:
        mask = ours[name] == 0
        zeros += int(mask.sum())
        kept += int((theirs[name][mask] == 0).sum())
    ids = torch.randint(model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    with torch.no_grad():
        expected = model(input_ids=ids.to(device)).logits.float().cpu()
        got = loaded(input_ids=ids).logits.float()
    return loaded, {"zeros_kept": kept / zeros if zeros else 1.0, "max_abs_logit_diff": float((got - expected).abs().max())}


def export_gguf(model, tokenizer, model_dir: Path, folder: Path, kinds: list[str], pruned: list[str], *,
                base: Path | None = None, evaluation=None, notify=lambda event: None) -> dict:
    """`folder/model-KIND.gguf` for each kind, each read back and measured; `{kind: info}`.

    `base`: the GGUF whose metadata and tokenizer to copy (default: the `.gguf` the
    model was loaded from, when its saved metadata records one that is still there).
    With an `evaluation` (`compressor.evaluate.Evaluation`), each file's perplexity and top-1
    agreement with the PyTorch model, by the run's protocol.
    """
    from ..generation import TorchDecoder
    from ..folder import directory_bytes, read_metadata
    from .parity import check_greedy, prompt_ids

    base = base or base_file(read_metadata(model_dir))
    dense_bytes = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors")) or directory_bytes(model_dir)
    result, reference, prompts = {}, TorchDecoder(model), prompt_ids(tokenizer)
    for kind in kinds:
        notify({"stage": f"export-gguf-{kind}"})
        path = folder / f"model-{kind}.gguf"
        info = write_gguf(model, tokenizer, model_dir, path, kind, base=base)
        loaded, check = read_back(path, model, pruned)
        info.update(check, path=f"{folder.name}/{path.name}", bytes_ratio=info["bytes"] / dense_bytes,
                    greedy=check_greedy(reference, TorchDecoder(loaded), prompts, tokenizer))
        if evaluation is not None:
            notify({"stage": f"eval-gguf-{kind}"})
            info.update(evaluation.measure(loaded))
        del loaded
        result[kind] = info
    return result
