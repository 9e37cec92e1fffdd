"""Text generation with a KV cache, from a PyTorch model or an exported ONNX decoder.

One loop serves both: the prompt goes through the model once (prefill), then one
token at a time with the keys and values of everything before it kept in a cache.
`TorchDecoder` and `OnnxDecoder` expose the same `forward(ids, cache)`, so greedy
decoding picks the same tokens from both whenever their logits agree, which is what
the export's parity check and `tapc generate` rely on.

`OnnxDecoder` runs the graphs `tapc export` writes (the names onnxruntime-genai uses:
`input_ids`, `attention_mask`, `position_ids` where the graph has it,
`past_key_values.N.key/value` -> `logits`, `present.N.key/value`) with onnxruntime,
and also answers `model(input_ids=...)` with an empty cache, so `perplexity()`
evaluates it like a PyTorch model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from .errors import UsageError
from .folder import GENAI_CONFIG, ONNX_NAME, onnx_bytes


@dataclass
class Sampling:
    """Sampling settings; `None` everywhere but `seed` would still sample from the full distribution."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0


class TorchDecoder:
    """A transformers causal LM behind `forward(ids, cache) -> (logits, cache)`."""

    kind = "pytorch"

    def __init__(self, model):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.config = model.config

    def empty_cache(self, batch: int):
        return None  # transformers creates a DynamicCache on the first call

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache):
        out = self.model(input_ids=ids.to(self.device), cache=cache, use_cache=True)
        return out.logits.float().cpu(), out.cache


def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the library does not print
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxDecoder:
    """An exported ONNX decoder with a KV cache, run by onnxruntime on the CPU."""

    kind = "onnx"

    def __init__(self, path: str | Path, config=None, threads: int | None = None):
        self.path = Path(path)
        self.session = _session(self.path, threads)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        if "input_ids" not in self.inputs or "logits" not in self.outputs:
            raise UsageError(f"{self.path} is not a decoder with inputs 'input_ids' and output 'logits'; "
                             "export it with `tapc export`")
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        if not self.past_names:
            raise UsageError(f"{self.path} has no KV-cache inputs (past_key_values.N.key); it was written by an "
                             "older tapc: export the model again with `tapc export`")
        self.config = config
        self.kv_heads, self.head_size = self._kv_layout()
        self.training = False

    def _kv_layout(self) -> tuple[int, int]:
        """Heads and head size of the cache, from genai_config.json beside the graph."""
        genai = self.path.with_name(GENAI_CONFIG)
        if genai.is_file():
            decoder = json.loads(genai.read_text())["model"]["decoder"]
            return decoder["num_key_value_heads"], decoder["head_size"]
        shape = self.inputs[self.past_names[0]].shape  # [batch, heads, past, head size]
        if all(isinstance(d, int) for d in (shape[1], shape[3])):
            return shape[1], shape[3]
        raise UsageError(f"{self.path} has no {GENAI_CONFIG} beside it to say the cache layout; export with `tapc export`")

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_size), np.float32) for n in self.past_names}

    def forward(self, ids: torch.Tensor, cache: dict[str, np.ndarray] | None):
        ids = ids.cpu().numpy().astype(np.int64)
        batch, length = ids.shape
        cache = cache if cache is not None else self.empty_cache(batch)
        past = cache[self.past_names[0]].shape[2]
        feed = {"input_ids": ids, **cache}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((batch, past + length), np.int64)
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.broadcast_to(np.arange(past, past + length, dtype=np.int64), (batch, length))
        results = dict(zip(self.outputs, self.session.run(None, feed)))
        present = {name: results[name.replace("past_key_values.", "present.", 1)] for name in self.past_names}
        return torch.from_numpy(results["logits"]), present

    # The part of the PyTorch model interface that perplexity() uses.
    def __call__(self, input_ids, **_):
        return SimpleNamespace(logits=self.forward(input_ids, None)[0])

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self


def next_token(logits: torch.Tensor, sampling: Sampling | None, generator: torch.Generator | None) -> int:
    """Greedy (argmax) without `sampling`; else temperature, top-k and top-p sampling."""
    if sampling is None:
        return int(logits.argmax())
    logits = logits.double() / max(sampling.temperature, 1e-6)
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p  # keep the smallest set reaching top_p
        probs = probs.index_fill(0, order[drop], 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class Generation:
    prompt_tokens: int
    tokens: list[int]
    prefill_seconds: float
    decode_seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: new tokens after the first, per second of decoding (prefill excluded)."""
        steps = len(self.tokens) - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")


def generate(decoder, prompt: list[int], max_new_tokens: int, *, sampling: Sampling | None = None,
             eos_token_id: int | list[int] | None = None, on_token: Callable[[int], None] | None = None) -> Generation:
    """Continue `prompt` by up to `max_new_tokens` tokens, stopping after an end-of-sequence token."""
    if not prompt:
        raise UsageError("the prompt is empty; give at least one token of text")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
    generator = torch.Generator().manual_seed(sampling.seed) if sampling else None
    tokens: list[int] = []
    started = time.perf_counter()
    logits, cache = decoder.forward(torch.tensor([prompt]), decoder.empty_cache(1))
    prefilled = time.perf_counter()
    while True:
        token = next_token(logits[0, -1], sampling, generator)
        tokens.append(token)
        if on_token:
            on_token(token)
        if len(tokens) >= max_new_tokens or token in eos:
            break
        logits, cache = decoder.forward(torch.tensor([[token]]), cache)
    return Generation(len(prompt), tokens, prefilled - started, time.perf_counter() - prefilled)


def onnx_path(spec: str) -> Path | None:
    """The ONNX graph `spec` names (a `.onnx` file, or a folder holding `model.onnx`), else None."""
    path = Path(spec).expanduser()
    if path.suffix == ".onnx":
        if not path.is_file():
            raise UsageError(f"ONNX model {spec} does not exist; check the path")
        return path
    if path.is_dir() and (path / ONNX_NAME).is_file() and not list(path.glob("*.safetensors")):
        return path / ONNX_NAME
    return None


def open_decoder(spec: str, **load_options):
    """(decoder, tokenizer, source) for a model directory, Hub id, `.gguf`, sparse folder or ONNX export."""
    from transformers import AutoConfig, AutoTokenizer

    from .models import load_model

    onnx = onnx_path(spec)
    if onnx is None:
        loaded = load_model(spec, **load_options)
        return TorchDecoder(loaded.model), loaded.tokenizer, loaded.source
    folder = onnx.parent
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder} has no config.json and tokenizer next to {onnx.name}; export with `tapc export`")
    decoder = OnnxDecoder(onnx, AutoConfig.from_pretrained(folder))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return decoder, tokenizer, {"spec": spec, "kind": "onnx", "path": str(onnx.resolve()), "bytes": onnx_bytes(onnx)}
