"""Loading checkpoints (Hub id, local directory, `.gguf` file) and finding prunable weights.

Safe by default: no remote code, and safetensors only; pickle checkpoints need an
explicit opt-in because unpickling runs arbitrary code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import UsageError
from .sparse import FILENAME as SPARSE_FILE
from .sparse import is_sparse, load_sparse_model


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: dict = field(default_factory=dict)  # what exactly was loaded, for the report


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _looks_like_path(spec: str) -> bool:
    # Hub ids look like "name" or "org/name"; anything else is meant as a local path.
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec


def load_model(
    spec: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer in float32 from a Hub id, a directory or a `.gguf`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec).expanduser()
    kwargs: dict = {"trust_remote_code": trust_remote_code, "dtype": torch.float32}
    source: dict = {"spec": spec}
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UsageError(f"model file {spec} does not exist; check the path")
        from transformers import GgufConfig

        folder, name = str(path.parent), path.name
        kwargs["gguf_file"] = name
        # Unpack every weight into a plain float32 nn.Linear: prunable, trainable, and saved by
        # save_pretrained (a model that keeps GGUF blocks is neither; transformers keeps them
        # whenever the optional `kernels` package is installed).
        kwargs["quantization_config"] = GgufConfig(gguf_file=name, dequantize=True)
        source.update(kind="gguf", path=str(path.resolve()), sha256=_sha256(path))
        tok_kwargs = {"gguf_file": name}
        location = folder
    elif path.is_dir() and is_sparse(path):
        source.update(kind="sparse", path=str(path.resolve()), sha256={SPARSE_FILE: _sha256(path / SPARSE_FILE)})
        location, tok_kwargs = str(path), {}
    elif path.is_dir():
        weights = sorted(path.glob("*.safetensors"))
        pickles = sorted(list(path.glob("*.bin")) + list(path.glob("*.pt")) + list(path.glob("*.pth")))
        if not weights and pickles and not allow_pickle:
            raise UsageError(
                f"{spec} holds only pickle weights ({pickles[0].name}), which can run code when loaded; "
                "convert them to safetensors or pass --allow-pickle if you trust the source"
            )
        if not weights and not pickles:
            raise UsageError(f"{spec} holds no model weights (*.safetensors); give a model directory")
        kwargs["use_safetensors"] = bool(weights)
        source.update(kind="directory", path=str(path.resolve()),
                      sha256={p.name: _sha256(p) for p in weights or pickles})
        location, tok_kwargs = str(path), {}
    elif _looks_like_path(spec) or spec.endswith((".safetensors", ".bin", ".pt")):
        raise UsageError(f"model path {spec} does not exist; give a model directory, a .gguf file or a Hub id")
    else:
        source.update(kind="hub", id=spec, revision=revision or "main")
        kwargs["revision"] = revision
        if not allow_pickle:
            kwargs["use_safetensors"] = True
        location, tok_kwargs = spec, {"revision": revision}

    if source["kind"] in ("directory", "sparse"):
        _check_causal_lm(path, spec)
    try:
        if source["kind"] == "sparse":
            model = load_sparse_model(path)
        else:
            model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **tok_kwargs)
    except ValueError as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "Unrecognized configuration class" in text or "not supported" in text.lower():
            raise UsageError(f"{spec} is not a causal language model ({text[:160]}); give a causal LM") from None
        raise UsageError(f"could not read model {spec} ({text[:200]}); is it a complete, valid model?") from None
    except (OSError, EnvironmentError) as exc:
        text = " ".join(str(exc).split())
        if source["kind"] == "hub":
            reason = text.split(". ")[0].split(", and ")[0]
            raise UsageError(
                f"could not load {spec!r} from the Hugging Face Hub ({reason[:160]}); check the id and "
                "your network, or give a local model directory or .gguf file"
            ) from None
        raise UsageError(f"could not read model {spec} ({text[:200]}); is the file complete?") from None
    except Exception as exc:  # corrupt files surface as many different exception types
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise UsageError(f"could not read model {spec} ({text[:200]}); is the file complete and not corrupt?") from None
    if source["kind"] == "gguf":
        # Belt and braces with dequantize=True above: the weights are plain float32, so no
        # GGUF quantizer may stay attached (save_pretrained refuses a model that has one)
        # and config.json must not claim GGUF quantization.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if source["kind"] == "hub":  # the exact snapshot the revision resolved to
        source["commit"] = getattr(model.config, "_commit_hash", None)
    source["parameters"] = sum(p.numel() for p in model.parameters())
    source["architecture"] = type(model).__name__
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)


def _check_causal_lm(folder: Path, spec: str) -> None:
    """Refuse a checkpoint whose saved architecture is not a language-model head.

    transformers would otherwise wrap, say, a BertModel in a fresh, untrained LM head.
    """
    import json

    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return  # from_pretrained reports a missing or broken config itself
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise UsageError(
            f"{spec} is a {architectures[0]}, not a causal language model; give a *ForCausalLM checkpoint"
        )


def model_context(model) -> int | None:
    """The longest sequence the model's position encoding supports, if the config says (a model or its config)."""
    config = getattr(model, "config", model)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


DEFAULT_WINDOW = 1024  # tokens per window when neither the caller nor a shorter context says otherwise


def window_length(model, requested: int | None = None, name: str = "--seq-len") -> int:
    """Tokens per training or evaluation window: `requested`, else the model's context up to
    DEFAULT_WINDOW. A requested window longer than the context is a one-line error naming `name`."""
    context = model_context(model)
    length = requested or min(context or DEFAULT_WINDOW, DEFAULT_WINDOW)
    if context and length > context:
        raise UsageError(f"{name} {length} exceeds the model's context of {context} tokens; use at most {context}")
    return length


def _is_projection(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D)) and module.weight.dim() == 2


def prunable_weights(model: nn.Module) -> dict[str, nn.Module]:
    """The attention and MLP projections: `{module name: module}` in model order.

    Excludes the LM head and anything sharing a weight with the embeddings, which
    the method keeps dense (docs/method.md) (they are lookups and the output layer, not block weights).
    """
    excluded = set()
    for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
        if emb is not None and getattr(emb, "weight", None) is not None:
            excluded.add(id(emb.weight))
    return {
        name: module
        for name, module in model.named_modules()
        if _is_projection(module) and id(module.weight) not in excluded
    }
