"""A recipe is the whole job as data: one YAML file checked by one typed schema.

Unknown keys are errors (a misspelt key would otherwise be silently ignored and the
job would run with a default the user did not choose). CLI flags override fields by
dotted path (`prune.sparsity`), and the report records the recipe that actually ran.
Times in the pruning schedule are fractions of the run, so `--steps` rescales the job.

A recipe may build on another with `base: NAME`: a YAML file relative to the recipe's own
file or, if there is none by that name, a built-in recipe. The base is loaded first (with its
own base) and the recipe's keys are merged over it: sections key by key; lists, scalars and
tables by sparsity replaced whole. `name` and `description` are never inherited (without them,
the file's stem and "based on NAME"). What is checked, run and written to OUT/recipe.yaml is
the merged recipe in full, without `base`.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UsageError
from .patterns import parse_pattern


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PruneConfig(_Section):
    """What is pruned, by which score, and how fast (docs/method.md: saliency, threshold, schedule)."""

    sparsity: float = Field(0.3, ge=0.0, lt=1.0, description="target fraction of prunable weights")
    method: Literal["dynamic", "sparsegpt", "wanda"] = Field(
        "dynamic", description="dynamic: masks follow the saliency while training (thesis); sparsegpt or wanda: "
                               "one-shot, layer by layer from calibration text, then the mask stays fixed")
    start: Literal["dense", "sparsegpt", "wanda"] = Field(
        "dense", description="first mask of the dynamic method: none (dense) or a one-shot mask at the target")
    calibration_windows: int = Field(32, ge=1, description="training windows (drawn by the seed) that one-shot "
                                                           "methods and global-wanda calibrate on")
    calibration_len: int | None = Field(None, ge=2, description="tokens per calibration window, cut from the "
                                        "training text (default: the training windows, data.seq_len tokens)")
    sparsegpt_block: int = Field(128, ge=1, description="SparseGPT: input columns masked together")
    sparsegpt_damp: float = Field(0.01, gt=0.0, description="SparseGPT: fraction of the mean Hessian diagonal added")
    saliency: str = Field("taylor", description="taylor (|w*g|), magnitude (|w|) or global-wanda (|w|*||x||, "
                                                "ranked over the whole model, unlike the Wanda paper)")
    score_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="running average of scores")
    score_loss: Literal["train", "ce", "sampled"] = Field(
        "ce", description="the loss whose gradient taylor scores use: next-token cross-entropy on the step's batch, "
        "sampled (the same with next tokens drawn from the model's own prediction: how much a weight moves its "
        "output, not how well it fits the text) or the training loss (ce's under train.loss ce; with kd, ce and "
        "sampled cost one more backward a step until the mask is fixed, and train scores the student's mismatch "
        "with its teacher, not a weight's importance)")
    score_steps: int = Field(0, ge=0, description="score only on the last N steps before each mask update "
                             "(0: every step); steps that only score (kd before the first mask) always do")
    schedule: str = Field("dynamic", description="dynamic (thesis eq. 4.6) or cubic")
    warmup: float = Field(0.1, ge=0.0, lt=1.0, description="no pruning before this fraction (or a table by "
                                                            "target sparsity, as optim.lr)")
    tau: float = Field(0.15, gt=0.0, description="time constant, fraction of the run")
    final: float = Field(0.7, gt=0.0, le=1.0, description="exact target from here; mask fixed")
    prune_every: int = Field(10, ge=1, description="steps between mask updates")
    stability: float = Field(1.0, ge=0.0, description="lambda in alpha = 1/(1+lambda*std/mean)")
    loss_window: int = Field(20, ge=2, description="steps of loss history for alpha")
    regrowth: bool = Field(True, description="masked weights may come back")
    pattern: str = Field("unstructured", description="unstructured, or N:M such as 2:4 (at most N of M inputs kept)")
    structure: list[Literal["mlp", "heads"]] = Field(
        default_factory=list, description="prune whole units instead of single weights: mlp (MLP channels), "
        "heads (query heads), or both; the saved model is cut to the smaller widths")

    @model_validator(mode="after")
    def _schedule_is_possible(self) -> PruneConfig:
        if self.final <= self.warmup:
            raise ValueError(
                f"prune.final ({self.final}) must be after prune.warmup ({self.warmup}); "
                "both are fractions of the run"
            )
        pattern = parse_pattern(self.pattern)
        if self.saliency == "wanda":
            raise ValueError("saliency wanda was renamed global-wanda (it ranks all weights together, unlike the "
                             "Wanda paper); for the paper's per-row Wanda use method: wanda or start: wanda")
        if self.method != "dynamic" and self.start != "dense":
            raise ValueError(f"start: {self.start} is for the dynamic method; method {self.method} makes its own mask")
        oneshot = self.method if self.method != "dynamic" else self.start
        if oneshot != "dense" and pattern.structured and abs(self.sparsity - pattern.min_sparsity) > 1e-9:
            raise ValueError(f"{oneshot} with pattern {pattern} prunes exactly {pattern.min_sparsity:g} of the weights; "
                             f"use --sparsity {pattern.min_sparsity:g}")
        if self.structure and (oneshot != "dense" or pattern.structured):
            raise ValueError("structured pruning (prune.structure) runs with the dynamic method from a dense start and "
                             "no N:M pattern; drop --method/--start-from/--pattern or --structure")
        if self.sparsity < pattern.min_sparsity:
            raise ValueError(
                f"pattern {pattern} masks at least {pattern.min_sparsity:.0%} of the weights, more than "
                f"the target sparsity {self.sparsity}; use --sparsity {pattern.min_sparsity:g} or higher"
            )
        return self


class OptimConfig(_Section):
    """AdamW and its learning-rate schedule (thesis Table 5.1)."""

    lr: float = Field(5e-5, gt=0.0, description="or a table by target sparsity, {0.3: 1e-4, 0.5: 2e-4}")
    lr_schedule: Literal["linear", "constant"] = "linear"
    warmup_steps: int = Field(0, ge=0, description="linear LR warmup before the decay")
    weight_decay: float = Field(0.01, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float | None = Field(1.0, gt=0.0, description="max global grad norm; null = off")


class TAConfig(_Section):
    """The terminal-attractor term added to AdamW (thesis eq. 4.10-4.15)."""

    enabled: bool = True
    lr: float | None = Field(None, ge=0.0, description="eta_TA; null = the AdamW lr (thesis)")
    gamma: float = Field(1.0, ge=0.0)
    beta: float = Field(0.5, gt=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0.0)
    clip: float = Field(1.0, gt=0.0, description="saturation C on the norm of the TA term")
    k: float = Field(1.0, gt=0.0, description="tanh(k*E) loss-dependent scaling")
    target: Literal["zero", "reference"] = Field(
        "zero", description="attract the loss to 0 (thesis) or to the dense model's loss"
    )
    space: Literal["gradient", "adam"] = Field(
        "gradient", description="TA direction: the raw gradient (thesis) or Adam's step"
    )
    before_clip: bool = Field(
        False, description="compute the term from the gradient before optim.grad_clip (thesis scaling "
        "E^beta/||g||); false: after clipping, where C binds once the loss is above C^(1/beta)")

    @model_validator(mode="after")
    def _before_clip_in_gradient_space(self):
        if self.before_clip and self.space != "gradient":
            raise ValueError("ta.before_clip needs ta.space: gradient")
        return self


class TrainConfig(_Section):
    steps: int | None = Field(None, ge=0, description="optimizer steps; null = from epochs; 0 = no training "
                                                      "(one-shot methods only)")
    epochs: float = Field(3.0, gt=0.0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    micro_batch: int | None = Field(None, ge=1, description="windows per forward and backward pass in each "
                                    "process (the batch is split, the step is the same); null = the whole "
                                    "batch, or split as the memory estimate requires")
    eval_every: int = Field(100, ge=0, description="validation loss period; 0 = off")
    val_batches: int = Field(8, ge=1, description="batches per validation-loss check")
    checkpoint_every: int = Field(100, ge=0, description="steps between checkpoints; 0 = only on a signal")
    max_recoveries: int = Field(3, ge=0, description="roll-backs after a non-finite loss before giving up")
    mixed_precision: Literal["no", "bf16"] = Field("no", description="bf16 autocast for the forward pass")
    loss: Literal["ce", "kd", "ce+kd"] = Field(
        "ce", description="ce: next-token cross-entropy on the training text (adapts the model to it); kd: KL "
                          "divergence to the dense model's predictions (keeps its behaviour); ce+kd: both, "
                          "(1 - kd_weight) * ce + kd_weight * kd")
    kd_temperature: float = Field(1.0, gt=0.0, description="softmax temperature of both models in the KD term "
                                                           "(the term is scaled by T^2)")
    kd_weight: float = Field(0.5, ge=0.0, le=1.0, description="weight of the KD term in ce+kd")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="several processes: ddp copies the model and its training state to every process; "
                           "fsdp shards weights, gradients, moments, scores and masks over them")


class DataConfig(_Section):
    dataset: str = Field("wikitext2", description="wikitext2 or a directory of train/validation/test.txt")
    seq_len: int | None = Field(None, ge=2, description="tokens per window; null = model context, at most 1024")
    self_distill: int = Field(0, ge=0, le=48, description="chat models: the dense model's greedy answers to the "
                                                           "first N of tapc's 64 instruction prompts join the "
                                                           "training text (the last 16 are never used)")
    self_distill_share: float = Field(0.25, gt=0.0, lt=1.0, description="fraction of training windows those "
                                                                         "conversations make up (repeated)")


class EvalConfig(_Section):
    """Perplexity protocol (docs/method.md): non-overlapping windows unless `stride` is set."""

    seq_len: int | None = Field(None, ge=2, description="null = data.seq_len")
    stride: int | None = Field(None, ge=1, description="sliding-window stride; null = non-overlapping")
    max_tokens: int | None = Field(None, ge=2, description="evaluate only the first N test tokens")
    batch_size: int = Field(4, ge=1)


GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # what the `gguf` package writes


class ExportConfig(_Section):
    """What `compress` writes besides the safetensors model (OUT/onnx*/, OUT/sparse/, OUT/gguf/)."""

    onnx: bool = Field(True, description="write OUT/onnx/: the fp32 decoder with KV cache, checked against PyTorch")
    quantize: list[Literal["int8", "int4"]] = Field(
        ["int8", "int4"], description="weight-only quantized copies, OUT/onnx-int8/ and OUT/onnx-int4/")
    int4_block_size: Literal[16, 32, 64, 128, 256] = Field(32, description="int4 weights sharing one scale")
    int4_layout: Literal["accurate", "fast"] = Field(
        "accurate", description="accurate: the int4 model keeps its LM head and its last int4_int8_layers at 8 bits; "
                                "fast: every matrix at 4 bits, as onnxruntime-genai's builder (its 8-bit kernels are "
                                "slower than its 4-bit ones for decoding, most on CPUs without AVX-512)")
    int4_int8_layers: float = Field(0.1, ge=0.0, le=1.0,
                                    description="fraction of the last decoder layers kept at 8 bits in the accurate "
                                                "int4 model")
    calibration_windows: int = Field(32, ge=0, description="training windows GPTQ calibrates int4 on; 0 = round-to-nearest")
    onnx_atol: float = Field(1e-3, gt=0.0, description="ONNX vs PyTorch: a logit difference this small always passes")
    onnx_rtol: float = Field(1e-3, gt=0.0, description="ONNX vs PyTorch: ... and one this small relative to the "
                                                       "largest logit (the tolerance also allows 10x PyTorch's own "
                                                       "fp32 error against float64)")
    sparse: bool = Field(True, description="write OUT/sparse/: non-zero values plus a bitmask")
    gguf: list[Literal[GGUF_TYPES]] = Field(
        [], description="OUT/gguf/model-TYPE.gguf for llama.cpp, Ollama and LM Studio, one per type (Llama, Gemma-3, "
                        "GPT-2)")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "int8" in data:
            raise ValueError("export.int8 was replaced by export.quantize, a list: [int8], [int4], [int8, int4] or []")
        return data

    @model_validator(mode="after")
    def _no_repeats(self) -> ExportConfig:
        for key in ("quantize", "gguf"):
            kinds = getattr(self, key)
            if len(set(kinds)) != len(kinds):
                raise ValueError(f"export.{key} lists a kind twice: {kinds}")
        return self


BY_SPARSITY = ("optim.lr", "prune.warmup")  # fields that may be a table by target sparsity


def by_sparsity(table: dict, sparsity: float, name: str) -> float:
    """The value for a run to `sparsity` from {sparsity: value, ...}: linear between the table's points, the
    nearest point's value outside them."""
    if not table or not all(isinstance(s, (int, float)) and 0.0 <= s < 1.0 and isinstance(v, (int, float))
                            for s, v in table.items()):
        raise ValueError(f"{name} table {table} needs one or more sparsity: value pairs, sparsities in [0, 1)")
    points = sorted(table.items())
    if sparsity <= points[0][0]:
        return points[0][1]
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if sparsity <= s1:
            return v1 if sparsity == s1 else v0 + (v1 - v0) * (sparsity - s0) / (s1 - s0)
    return points[-1][1]


class Recipe(_Section):
    name: str = "custom"
    description: str = ""
    seed: int = 0
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    prune: PruneConfig = PruneConfig()
    optim: OptimConfig = OptimConfig()
    ta: TAConfig = TAConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()

    @model_validator(mode="before")
    @classmethod
    def _read_tables(cls, data):  # a table becomes the number this run uses, before anything reads it
        if not isinstance(data, dict):
            return data
        sparsity = (data.get("prune") or {}).get("sparsity", PruneConfig.model_fields["sparsity"].default)
        data = dict(data)
        for dotted in BY_SPARSITY:
            section, key = dotted.split(".")
            if isinstance(data.get(section), dict) and isinstance(data[section].get(key), dict):
                if not isinstance(sparsity, (int, float)):
                    return data  # prune.sparsity's own error says what is wrong
                data[section] = {**data[section], key: by_sparsity(data[section][key], sparsity, dotted)}
        return data

    @model_validator(mode="after")
    def _something_prunes(self) -> Recipe:
        if self.train.steps == 0 and self.prune.method == "dynamic" and self.prune.sparsity > 0:
            raise ValueError("train.steps 0 (--steps 0) leaves nothing to the dynamic method, which prunes while "
                             "training; use prune.method (--method) sparsegpt or wanda to prune without training")
        return self


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with tapc (usable as `--recipe NAME`)."""
    folder = resources.files("compressor") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


GPU_RECIPE, CPU_RECIPE = "gpt2-wikitext2", "quick-cpu"  # what `tapc compress` runs without --recipe
STRUCTURED_CPU_RECIPE = "structured-cpu"  # ... and off a GPU with --structure


def default_recipe(device: str | None = None, structure: bool = False) -> tuple[str, str]:
    """The built-in recipe a run without one gets on `device` (auto: a CUDA GPU if there is one), and why.

    A GPU gets the full budget (3 epochs of 8 x 1024-token windows, hours); anything else,
    a laptop or a CI runner, the quick one (120 steps of 256 tokens, about 25 minutes for a
    135M model on 2 cores), since the full budget would take days on a CPU. With `structure`
    (whole units) off a GPU, the quick budget with units scored by their activations and
    chosen early: on SmolLM2-135M at 10%, 20% and 30% it drifts less than Taylor scores over
    the whole run, on the test text and on held-out chat alike (benchmarks/RESULTS.md).
    """
    import torch

    name = device or "auto"
    gpu = name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())
    if gpu:
        return GPU_RECIPE, f"the device is a CUDA GPU ({name}): the full budget"
    where = "no CUDA GPU found" if name == "auto" else f"the device is {name}"
    if structure:
        return STRUCTURED_CPU_RECIPE, (f"{where}: the quick CPU budget for whole units; --recipe {GPU_RECIPE} is "
                                       "the full one")
    return CPU_RECIPE, f"{where}: the quick CPU budget; --recipe {GPU_RECIPE} is the full one"


def _builtin_folder() -> Path:
    return Path(str(resources.files("compressor") / "recipes"))


def _locate(source: str | Path, folder: Path | None = None, label: str | None = None) -> Path:
    """The file `source` names: a YAML file (relative to `folder`, else to the working directory) or,
    failing that, a built-in recipe. `label` is the recipe whose `base` it is, for the error."""
    path = Path(source) if folder is None else folder / source
    if path.is_file():
        return path
    name = str(source).removesuffix(".yaml")
    if name not in builtin_recipes():
        names = ", ".join(builtin_recipes())
        if label is None:
            raise UsageError(f"recipe {source!r} not found: give a YAML file or one of {names}")
        raise UsageError(f"{label}: base {source!r} not found: give a YAML file (relative to this one) "
                         f"or one of {names}")
    return _builtin_folder() / f"{name}.yaml"


def _short(path: Path) -> str:
    """A built-in recipe by its name, any other file by its path (for the cycle error)."""
    return path.stem if path.resolve().parent == _builtin_folder().resolve() else str(path)


def _read(path: Path, label: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise UsageError(f"recipe {label} is not valid YAML ({first}); fix its syntax") from None
    if not isinstance(data, dict):
        raise UsageError(f"recipe {label} must be a YAML mapping of sections, not {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], child: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`child` over `base`: mappings merged key by key, anything else (a list, a scalar, a table by
    sparsity, which is one value) replaced."""
    merged = dict(base)
    for key, value in child.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and dotted not in BY_SPARSITY:
            merged[key] = _merge(merged[key], value, f"{dotted}.")
        else:
            merged[key] = value
    return merged


def _resolve(path: Path, label: str, seen: tuple[tuple[Path, str], ...] = ()
             ) -> tuple[dict[str, Any], list[tuple[str, dict]]]:
    """The recipe in `path` with its bases merged in, and each file's own mapping (the file first, then
    its bases), so that an error can name the file that holds the faulty key. `seen`: the files that
    led here, to catch a cycle."""
    if path.resolve() in (real for real, _ in seen):
        cycle = " -> ".join(name for _, name in (*seen, (path, _short(path))))
        raise UsageError(f"recipe bases form a cycle: {cycle}; remove one of those base: keys")
    data = _read(path, label)
    if "base" not in data:
        return data, [(label, data)]
    base = data.pop("base")
    if not isinstance(base, str) or not base:
        raise UsageError(f"recipe {label}: base must be a built-in recipe name or a YAML file, not {base!r}")
    base_path = _locate(base, path.parent, f"recipe {label}")
    parent, sources = _resolve(base_path, str(base_path), (*seen, (path.resolve(), _short(path))))
    merged = _merge(parent, data)
    # A recipe's name and description are its own, never its base's: without them, the file's stem and its base.
    merged["name"] = data.get("name", path.stem)
    merged["description"] = data.get("description", f"based on {base}")
    return merged, [(label, data), *sources]


def recipe_data(source: str | Path) -> dict[str, Any]:
    """The mapping a recipe file (or built-in name) holds with its bases merged in: before flags,
    tables by sparsity and the schema's defaults."""
    path = _locate(source)
    return _resolve(path, str(path))[0]


def load_recipe(source: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Load a recipe from a YAML path or a built-in name (its bases merged in), then apply dotted overrides.

    `None` gives the default job for the device the overrides (or auto) name: `default_recipe`.
    """
    if source is None:
        source = default_recipe((overrides or {}).get("device"), bool((overrides or {}).get("prune.structure")))[0]
    path = _locate(source)
    label = str(path)
    data, sources = _resolve(path, label)
    data = copy.deepcopy(data)  # the flags below must not write into the files' own mappings
    flags: dict[str, Any] = {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        for target in (data, flags):
            node = target
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
    return validate_recipe(data, label, [(label, flags), *sources])


def _holds(data: Any, loc: tuple) -> bool:
    for key in loc:
        if isinstance(data, dict) and key in data:
            data = data[key]
        elif isinstance(data, list) and isinstance(key, int) and key < len(data):
            data = data[key]
        else:
            return False
    return True


def validate_recipe(data: dict[str, Any], label: str = "recipe",
                    sources: list[tuple[str, dict]] | None = None) -> Recipe:
    """The checked recipe, or a one-line UsageError naming the file (of `sources`, the recipe's own
    mapping and its bases', first first) that holds the faulty key; `label` where none does."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "recipe"
        if err["loc"]:
            label = next((name for name, raw in sources or () if _holds(raw, err["loc"])), label)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling against the recipe schema in the README"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise UsageError(f"{label}: {where}: {msg}{more}") from None


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
