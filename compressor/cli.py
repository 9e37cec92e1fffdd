"""The `tapc` command: parses options, calls the library, renders progress and results.

Results go to stdout (a table, or one JSON document with --json); progress and
errors go to stderr. Exit codes: 0 ok, 1 the job failed, 2 bad input or usage.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from . import __version__
from .errors import TapcError


GATE_FAILED = 3  # exit code of a run whose pruned model missed --max-ppl / --max-ppl-increase


def _kind_list(value: str | None, allowed, what: str) -> list[str] | None:
    """`int8,int4` -> ["int8", "int4"]; `none` -> []; None (not given) stays None."""
    if value is None:
        return None
    kinds = [] if value.strip().lower() == "none" else [k.strip().lower() for k in value.split(",") if k.strip()]
    bad = [k for k in kinds if k not in allowed]
    if bad or len(set(kinds)) != len(kinds):
        raise click.BadParameter(f"{value!r}: give {what} from {', '.join(allowed)}, comma-separated, or none")
    return kinds


def _kinds(value: str | None) -> list[str] | None:
    return _kind_list(value, ("int8", "int4"), "quantized kinds")


def _units(value: str | None) -> list[str] | None:
    return _kind_list(value, ("mlp", "heads"), "structured units")


def _gguf_types(value: str | None) -> list[str] | None:
    from .recipe import GGUF_TYPES

    return _kind_list(value, GGUF_TYPES, "GGUF types")


class TapcClickError(click.ClickException):
    def __init__(self, error: TapcError):
        super().__init__(str(error))
        self.exit_code = error.exit_code


def run_job(debug: bool, job: Callable):
    """Run `job`, turning library errors into one-line CLI errors with their exit codes."""
    try:
        return job()
    except TapcError as exc:
        if debug:
            raise
        raise TapcClickError(exc) from None
    except Exception as exc:  # a bug or an environment problem: one line, traceback on --debug
        if debug:
            raise
        text = " ".join(str(exc).split())[:300]
        raise click.ClickException(
            f"unexpected {type(exc).__name__}: {text}; rerun with --debug for the traceback"
        ) from None


class ProgressView:
    """Renders the library's progress events with rich on stderr."""

    LABELS = {"memory": "memory estimate", "load": "loading model", "data": "tokenizing data",
              "eval-dense": "dense perplexity", "train": "pruning + recovery",
              "oneshot": "one-shot pruning, layer by layer",
              "self-distill": "dense model answering instruction prompts",
              "dry-run": "timing training steps", "eval-pruned": "pruned perplexity", "save": "saving",
              "export-sparse": "writing sparse artifact", "export-onnx": "exporting ONNX with KV cache, checking it",
              "export-int8": "int8 ONNX", "export-int4": "int4 ONNX", "calibrate-int4": "GPTQ calibration (int4)",
              "eval-int8": "int8 ONNX perplexity", "eval-int4": "int4 ONNX perplexity",
              "eval-quantized": "quantized ONNX perplexity", "eval": "perplexity"}

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console, transient=True,
        )
        self.task = None
        self.stage = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def __call__(self, event: dict) -> None:
        stage = event["stage"]
        if stage != self.stage:
            self.stage = stage
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(self.LABELS.get(stage, stage), total=None, info="")
            self.console.log(f"{self.LABELS.get(stage, stage)}")
        if "total" in event:
            done = event.get("step", event.get("done", 0))
            info = ""
            if stage == "train":
                info = f"loss {event['loss']:.4f}  sparsity {event['sparsity']:.2%}"
                # Without a terminal (CI logs) the bar is invisible: print a line every 10%.
                if not self.console.is_terminal and done % max(1, event["total"] // 10) == 0:
                    self.console.log(f"step {done}/{event['total']}  {info}  eta {event['eta']:.0f} s")
            elif stage == "oneshot" and not self.console.is_terminal:
                self.console.log(f"layer {done}/{event['total']} pruned")
            self.progress.update(self.task, total=event["total"], completed=done, info=info)
        if event.get("resumed") is not None:
            self.console.log(f"resumed from the checkpoint at step {event['resumed']}")
        if event.get("recovery"):
            r = event["recovery"]
            self.console.log(f"non-finite loss at step {r['step']}: rolled back to step {r['restored_to']} "
                             "and halved the step sizes")
        update = event.get("mask_update")
        if update:
            self.console.log(
                f"step {update['step']}: mask update to {update['sparsity']:.2%} "
                f"(alpha {update['alpha']:.3f}, pruned {update['pruned']:,}, regrown {update['regrown']:,})"
            )
        if event.get("line"):
            self.console.print(Text(event["line"]), soft_wrap=True)
        if event.get("warning"):
            # One line, whatever the width; Text keeps "tapc[plots]" from being read as markup.
            self.console.print(Text.assemble(("warning: ", "yellow"), event["warning"]), soft_wrap=True)
        if event.get("validation"):
            v = event["validation"]
            self.console.log(f"step {v['step']}: validation loss {v['loss']:.4f}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tapc")
def cli():
    """tapc: prune language models to a target sparsity with terminal-attractor recovery."""


@cli.command()
@click.argument("model")
@click.option("--sparsity", type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Target fraction of prunable weights set to zero, in [0, 1).")
@click.option("--recipe", "recipe_path", metavar="YAML|NAME",
              help="Recipe file or built-in recipe name (default: gpt2-wikitext2 on a CUDA GPU, quick-cpu "
                   "elsewhere, structured-cpu there with --structure; stderr says which ran).")
@click.option("--dataset", help="'wikitext2' or a directory with train.txt, validation.txt, test.txt.")
@click.option("--out", type=click.Path(), help="Output directory (default: MODEL-tapc-sNN).")
@click.option("--method", type=click.Choice(["dynamic", "sparsegpt", "wanda"]),
              help="dynamic: prune while training (default); sparsegpt or wanda: one-shot from calibration text, "
                   "mask fixed after (with --steps 0: no training).")
@click.option("--start-from", "start", type=click.Choice(["dense", "sparsegpt", "wanda"]),
              help="First mask of the dynamic method: dense (default) or a one-shot mask at the target.")
@click.option("--loss", type=click.Choice(["ce", "kd", "ce+kd"]),
              help="Recovery loss: ce (cross-entropy on the training text, adapts the model to it), kd "
                   "(distillation from the dense model, keeps its behaviour) or ce+kd.")
@click.option("--parallel", type=click.Choice(["ddp", "fsdp"]),
              help="Under torchrun/accelerate: ddp (a whole copy per process, default) or fsdp (sharded, for "
                   "models whose training state does not fit one device).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Windows per optimizer step over all processes "
                                                               "(a multiple of the process count).")
@click.option("--steps", type=click.IntRange(min=0), help="Optimizer steps (overrides the recipe's epochs); "
                                                          "0 with a one-shot method: no training.")
@click.option("--seq-len", type=click.IntRange(min=2), help="Tokens per training window (and evaluation window unless the recipe sets eval.seq_len).")
@click.option("--eval-tokens", type=click.IntRange(min=2), help="Evaluate only the first N test tokens.")
@click.option("--pattern", help="Sparsity pattern: unstructured (default) or N:M such as 2:4.")
@click.option("--structure", metavar="UNITS", callback=lambda c, p, v: _units(v),
              help="Prune whole units: mlp (MLP channels), heads (query heads) or mlp,heads; the saved model "
                   "and its exports are cut to the smaller widths (default: single weights).")
@click.option("--onnx/--no-onnx", "onnx", default=None, help="Write OUT/onnx/ (default: the recipe's export.onnx, on).")
@click.option("--quantize", metavar="KINDS", callback=lambda c, p, v: _kinds(v),
              help="Quantized ONNX copies: int8, int4, both (int8,int4) or none (default: the recipe's, both).")
@click.option("--int4-layout", type=click.Choice(["accurate", "fast"]),
              help="int4 ONNX: accurate (LM head and last layers at 8 bits) or fast (all 4-bit, as "
                   "onnxruntime-genai's builder); default: the recipe's export.int4_layout, accurate.")
@click.option("--gguf", metavar="TYPES", callback=lambda c, p, v: _gguf_types(v),
              help="GGUF files for llama.cpp/Ollama: f16, bf16, q8_0, q4_0, ... comma-separated, or none "
                   "(default: the recipe's export.gguf, none).")
@click.option("--seed", type=int, help="Random seed (a CPU run repeats exactly).")
@click.option("--device", help="auto, cpu, cuda or cuda:N.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), help="Steps between checkpoints (0: only on a signal).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint (OUT.checkpoint/).")
@click.option("--max-ppl-increase", type=click.FloatRange(min=0), metavar="PCT",
              help=f"Quality gate: exit {GATE_FAILED} if pruned perplexity exceeds dense by more than PCT percent.")
@click.option("--max-ppl", type=click.FloatRange(min=0, min_open=True), metavar="VALUE",
              help=f"Quality gate: exit {GATE_FAILED} if pruned perplexity exceeds VALUE.")
@click.option("--dry-run", is_flag=True, help="Estimate memory, time a few training steps, print the plan and exit; "
                                               "writes nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (and any checkpoint) instead of refusing.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the Hub to run (unsafe).")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle (.bin/.pt) weights, which can run code.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def compress(model, sparsity, recipe_path, dataset, out, method, start, loss, parallel, batch_size, steps, seq_len, eval_tokens, pattern, structure, onnx, quantize, int4_layout, gguf, seed, device,
             checkpoint_every, resume, max_ppl_increase, max_ppl, dry_run, as_json, overwrite, trust_remote_code,
             allow_pickle, debug):
    """Prune MODEL (Hub id, model directory or .gguf file) while fine-tuning it, then save it.

    SIGINT or SIGTERM stops after the current step with a checkpoint (exit 130); the
    same command with --resume continues exactly where it stopped.
    """
    from .errors import ExportError
    from .pipeline import compress as run_compress
    from .recipe import default_recipe, load_recipe
    from .pipeline import Gates

    overrides = {
        "prune.sparsity": sparsity, "data.dataset": dataset, "train.steps": steps,
        "data.seq_len": seq_len, "eval.max_tokens": eval_tokens, "seed": seed, "device": device,
        "train.checkpoint_every": checkpoint_every, "prune.pattern": pattern, "prune.structure": structure,
        "export.onnx": onnx,
        "export.quantize": quantize, "export.int4_layout": int4_layout, "export.gguf": gguf, "prune.method": method, "prune.start": start,
        "train.loss": loss, "train.parallel": parallel, "train.batch_size": batch_size,
    }
    console = Console(stderr=True)
    gates = Gates(max_ppl_increase=max_ppl_increase, max_ppl=max_ppl)

    def job():
        choice = None
        if recipe_path is None:
            name, why = default_recipe(device, bool(structure))
            choice = f"{name}: {why}"
            console.print(Text(f"recipe {name} ({why}; choose one with --recipe)"), soft_wrap=True)
        recipe = load_recipe(recipe_path or name, overrides)
        with ProgressView(console) as view, stop_on_signals(console) as stop:
            try:
                return run_compress(model, recipe, out, overwrite=overwrite, resume=resume, gates=gates,
                                    trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                                    progress=view, stop=stop.is_set, dry_run=dry_run, recipe_choice=choice)
            except ExportError as exc:  # the rest was written: a CI job still gets its report
                if as_json and exc.result is not None and exc.result.report:
                    click.echo(json.dumps(exc.result.report, indent=2, default=str))
                raise

    result = run_job(debug, job)
    if not result.report:  # a non-main process of a distributed run: rank 0 reports
        return
    if dry_run:
        click.echo(json.dumps(result.report, indent=2) if as_json else _plan_lines(result.report))
        return
    click.echo(json.dumps(result.report, indent=2, default=str) if as_json else result.table)
    if not result.report["gates"]["passed"]:
        for failure in result.report["gates"]["failures"]:
            click.echo(f"Error: quality gate failed: {failure}; the outputs are kept in {result.output}", err=True)
        sys.exit(GATE_FAILED)


def _plan_lines(plan: dict) -> str:
    from .memory import GB

    mem = plan["memory_estimate"]
    lines = [f"steps             {plan['steps']:,} ({plan['train_windows']:,} training windows)",
             f"time per step     {plan['seconds_per_step']:.2f} s (median of {len(plan['timed_steps'])} timed steps "
             f"on {plan['device']}); training about {plan['train_seconds_estimate'] / 60:.1f} min"]
    if plan["oneshot_seconds"] is not None:
        lines.append(f"one-shot pruning  {plan['oneshot_seconds']:.0f} s")
    lines.append(f"whole job         about {plan['wall_seconds_estimate'] / 60:.0f} min: loading "
                 f"{plan['setup_seconds'] / 60:.1f}, training {plan['train_seconds_estimate'] / 60:.1f}, evaluations "
                 f"{plan['eval_seconds_estimate'] / 60:.1f}, exports {plan['export_seconds_estimate'] / 60:.1f} "
                 "(scaled from SmolLM2-135M on 2 CPU cores)")
    if plan["memory_estimate"] and plan["memory_estimate"]["split"]:
        lines.append(f"micro-batches     {plan['memory_estimate']['split']}")
    if mem:
        free = f", {mem['available_bytes'] / GB:.1f} GB available" if mem["available_bytes"] else ""
        lines.append(f"memory            estimate {mem['peak_bytes'] / GB:.2f} GB per process{free}; "
                     f"{mem['state_bytes_per_param']:.1f} bytes of training state per parameter")
    if plan["measured_peak_rss"]:
        lines.append(f"measured          peak resident memory {plan['measured_peak_rss'] / GB:.2f} GB after the "
                     "timed steps")
    return "\n".join(lines)


class stop_on_signals:
    """SIGINT/SIGTERM set an event the job polls once per step; a second SIGINT aborts at once."""

    def __init__(self, console: Console):
        self.console, self.event, self.saved = console, threading.Event(), {}

    def _handle(self, signum, frame):
        if self.event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.event.set()
        self.console.log(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                         "(Ctrl-C again to abort without one)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._handle)
        return self.event

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


@cli.command()
@click.argument("runs", nargs=-1, required=True, metavar="OUT...")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON on stdout.")
@click.option("--markdown", is_flag=True, help="Print a Markdown table (for a pull-request comment).")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def compare(runs, as_json, markdown, debug):
    """Compare finished runs (their --out directories) in one table.

    Columns: run, model, sparsity reached, pattern, dense and pruned perplexity,
    change, KL to the dense model and top-1 agreement with it, recovery loss, steps
    and total time.
    """
    from .compare import compare_runs, format_comparison

    if as_json and markdown:
        raise click.UsageError("--json and --markdown are alternatives; give one of them")
    comparison = run_job(debug, lambda: compare_runs(list(runs)))
    if as_json:
        click.echo(json.dumps(comparison, indent=2))
        return
    click.echo(format_comparison(comparison, markdown=markdown))
    if comparison["note"]:
        click.echo(f"note: {comparison['note']}", err=True)


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--out", type=click.Path(), help="Where onnx*/, sparse/ and gguf/ go (default: beside a folder named "
              "model, else MODEL-export).")
@click.option("--onnx/--no-onnx", default=None,
              help="Write onnx/: the fp32 decoder with KV cache, checked against PyTorch (default: on, unless --gguf).")
@click.option("--quantize", metavar="KINDS", default="int8,int4", show_default=True, callback=lambda c, p, v: _kinds(v),
              help="Quantized copies onnx-int8/, onnx-int4/: int8, int4, int8,int4 or none.")
@click.option("--int4-layout", type=click.Choice(["accurate", "fast"]), default="accurate", show_default=True,
              help="accurate: LM head and last 10% of layers at 8 bits in the int4 model; fast: all 4-bit, as "
                   "onnxruntime-genai's builder (faster to decode, most on AVX2 CPUs; less accurate).")
@click.option("--int4-block-size", type=click.Choice(["16", "32", "64", "128", "256"]), default="32", show_default=True,
              help="int4 weights that share one scale.")
@click.option("--dataset", help="Calibrate int4 (GPTQ) on its train.txt and measure every model's perplexity and "
              "top-1 agreement on its test.txt ('wikitext2' or a directory); without it int4 is round-to-nearest.")
@click.option("--seq-len", type=click.IntRange(min=2), help="Window length with --dataset (default: the model's "
              "context, at most 1024).")
@click.option("--eval-tokens", type=click.IntRange(min=2), help="With --dataset, evaluate only the first N test tokens.")
@click.option("--sparse/--no-sparse", default=None,
              help="Write sparse/: non-zero values plus a bitmask (default: on, unless --gguf).")
@click.option("--gguf", metavar="TYPES", callback=lambda c, p, v: _gguf_types(v),
              help="Write gguf/model-TYPE.gguf for llama.cpp, Ollama and LM Studio: f16, bf16, q8_0, q4_0, q4_1, "
                   "q5_0, q5_1 or f32, comma-separated; alone, only the GGUF files are written.")
@click.option("--gguf-base", type=click.Path(), help="Copy the GGUF metadata and tokenizer from this .gguf (default: "
              "the .gguf the run started from, when its model records one).")
@click.option("--atol", type=click.FloatRange(min=0.0, min_open=True), default=1e-3, show_default=True,
              help="A |logit difference| between ONNX and PyTorch this small always passes.")
@click.option("--rtol", type=click.FloatRange(min=0.0, min_open=True), default=1e-3, show_default=True,
              help="... and one this small relative to the largest logit (10x PyTorch's own fp32 error against "
                   "float64 also passes).")
@click.option("--json", "as_json", is_flag=True, help="Print the export summary as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace existing onnx*/ or sparse/ folders.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def export(model, out, onnx, quantize, int4_layout, int4_block_size, dataset, seq_len, eval_tokens, sparse, gguf, gguf_base, atol,
           rtol, as_json, overwrite, debug):
    """Export a saved MODEL directory to ONNX with a KV cache (fp32, int8, int4), the compact sparse format and GGUF."""
    from .export import export_lines, export_model
    from .recipe import ExportConfig

    console = Console(stderr=True)

    def job():
        default = not gguf  # --gguf alone writes only the GGUF files
        with_onnx = default if onnx is None else onnx
        config = ExportConfig(onnx=with_onnx, quantize=quantize if with_onnx else [],
                              sparse=default if sparse is None else sparse, gguf=gguf or [], onnx_atol=atol,
                              onnx_rtol=rtol, int4_block_size=int(int4_block_size),
                              int4_layout=int4_layout)
        with ProgressView(console) as view:
            return export_model(model, out, config=config, dataset=dataset, seq_len=seq_len, max_tokens=eval_tokens,
                                gguf_base=gguf_base, overwrite=overwrite, progress=view)

    result = run_job(debug, job)
    click.echo(json.dumps(result, indent=2, default=str) if as_json else "\n".join(export_lines(result)))


@cli.command()
@click.argument("model")
@click.option("--prompt", required=True, help="The text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding (see --temperature, --top-k, --top-p).")
@click.option("--temperature", type=click.FloatRange(min=0.0, min_open=True), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=1), help="Sample among the K most likely tokens only.")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), help="Sample among the most likely tokens "
              "whose probabilities add up to P.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template (instruct models).")
@click.option("--ignore-eos", is_flag=True, help="Keep going past an end-of-sequence token.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def generate(model, prompt, max_new_tokens, sample, temperature, top_k, top_p, seed, chat, ignore_eos, debug):
    """Continue --prompt with MODEL (a model directory, Hub id, .gguf, sparse/ folder, or an onnx*/ folder).

    Tokens stream to stdout as they are generated (with a KV cache); the speed goes to
    stderr. Greedy unless --sample.
    """
    from .generation import Sampling, generate as run_generate, open_decoder

    console = Console(stderr=True)
    if not sample and any(v is not None for v in (top_k, top_p)):
        raise click.UsageError("--top-k and --top-p apply to sampling; add --sample")

    def job():
        decoder, tokenizer, _ = open_decoder(model)
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise click.UsageError(f"{model} has no chat template; leave out --chat")
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]
        else:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        stream = TokenStream(tokenizer)
        sampling = Sampling(temperature, top_k, top_p, seed) if sample else None
        eos = None if ignore_eos else tokenizer.eos_token_id
        result = run_generate(decoder, ids, max_new_tokens, sampling=sampling, eos_token_id=eos, on_token=stream)
        stream.close()
        return result

    result = run_job(debug, job)
    console.print(f"{result.prompt_tokens} prompt tokens in {result.prefill_seconds:.2f} s; {len(result.tokens)} new "
                  f"tokens, {result.tokens_per_second:.1f} tokens/s after the first", highlight=False)


class TokenStream:
    """Prints generated text as it grows, holding back a character still incomplete in UTF-8."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.printed = tokenizer, [], ""

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd") and text.startswith(self.printed):
            click.echo(text[len(self.printed):], nl=False)
            sys.stdout.flush()
            self.printed = text

    def close(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        click.echo(text[len(self.printed):] if text.startswith(self.printed) else "")
        sys.stdout.flush()  # before the speed line on stderr


@cli.command(name="eval")
@click.argument("model")
@click.option("--dataset", default="wikitext2", show_default=True,
              help="'wikitext2' or a directory with test.txt (and train.txt).")
@click.option("--seq-len", type=click.IntRange(min=2), help="Window length (default: the model's context, at most 1024).")
@click.option("--stride", type=click.IntRange(min=1), help="Sliding-window stride (default: non-overlapping windows).")
@click.option("--eval-tokens", type=click.IntRange(min=2), help="Evaluate only the first N test tokens.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--reference", metavar="MODEL", help="Also measure the drift from this model (usually the dense one): "
              "mean KL(reference || MODEL) per token and top-1 agreement, on the same tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def evaluate(model, dataset, seq_len, stride, eval_tokens, batch_size, reference, as_json, debug):
    """Perplexity of MODEL: a model directory, Hub id, .gguf, sparse/ folder, or .onnx file (or onnx*/ folder)."""
    from .evaluate import evaluate_model

    console = Console(stderr=True)

    def job():
        with ProgressView(console) as view:
            return evaluate_model(model, dataset, seq_len=seq_len, stride=stride, max_tokens=eval_tokens,
                                  batch_size=batch_size, reference=reference, progress=view)

    result = run_job(debug, job)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        ppl = result["perplexity"]
        click.echo(f"perplexity {ppl['ppl']:.4f}  ({ppl['tokens']:,} tokens; {ppl['protocol']})")
        if ppl.get("kl") is not None:
            click.echo(f"drift      KL(reference || model) {ppl['kl']:.4f} nats/token, top-1 agreement "
                       f"{ppl['agreement']:.2%}  (reference: {reference})")


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--pattern", help="Check this N:M pattern (default: the one the run recorded, if any).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def report(model, pattern, as_json, debug):
    """Per-layer sparsity of a saved MODEL directory, sparse/ folder or .gguf file, counted from its weights.

    Exits 1 if an N:M pattern does not hold in every group.
    """
    from .report import inspect_checkpoint
    from .report import layer_table

    result = run_job(debug, lambda: inspect_checkpoint(model, pattern))
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        sp = result["sparsity"]
        lines = layer_table(sp) + [
            "",
            f"global sparsity   {sp['prunable_sparsity']:.4%} of {sp['prunable_params']:,} projection weights; "
            f"{sp['total_sparsity']:.2%} of all {sp['total_params']:,} parameters",
            f"files             {result['bytes'] / 1e6:.1f} MB ({result['format']})",
        ]
        check = result.get("pattern")
        if check:
            verdict = "holds in every group" if check["holds"] else f"VIOLATED in {check['violating_groups']:,} groups"
            lines.append(f"pattern {check['pattern']:<9} {verdict} of {check['groups']:,} ({check['source']})")
        click.echo("\n".join(lines))
    check = result.get("pattern")
    if check and not check["holds"]:
        raise click.ClickException(
            f"pattern {check['pattern']} does not hold in {check['violating_groups']} groups "
            f"(layers: {', '.join(check['violating_layers'][:3])})"
        )


def main():
    cli(prog_name="tapc")


if __name__ == "__main__":
    sys.exit(main())
