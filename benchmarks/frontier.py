"""Size, speed and quality of every artifact of several runs, on one table and one picture.

    python -m benchmarks.frontier --run dense=out/dense --run s30=out/smollm2-s30 \\
        --run struct30=out/smollm2-struct30 --results benchmarks/results/frontier.json

Each `--run LABEL=DIR` is the output of `tapc compress` (or of `tapc export` with
`--dataset` on the dense model, whose `export.json` holds the figures). For every
artifact there (PyTorch safetensors, ONNX fp32 / int8 / int4, each GGUF file):

- bytes on disk;
- decode tokens/s (greedy, 128 new tokens after a 5-token prompt, batch 1, tapc's loop on
  onnxruntime; PyTorch for the safetensors) and prefill tokens/s (one 512-token prompt),
  medians of `--repeats` runs taken round-robin over all artifacts of all runs, so a busy
  spell weighs on every artifact alike; GGUF files in llama.cpp's `llama-bench` (`--llama-bench`:
  its decode test generates 128 tokens from an empty context, its prefill one of 512),
  one run of it per turn of the same round-robin, with as many threads;
- perplexity, KL to the dense model and top-1 agreement, as the run measured them
  (`report.json`: the same protocol for every run, KL to the same dense model); where a run
  has no KL (the dense model's own quantized files, exported by `tapc export`), it is
  measured here against the first run's PyTorch model (the dense one) on the same windows;
- held-out chat KL: KL to the dense model per token of its own greedy answers to
  structured_peers' 16 chat prompts (its `chat.json`), text no run trained on, measured
  here for every artifact (ONNX through onnxruntime, GGUF read back by transformers).

`--keep RESULTS` adds the rows of an earlier results JSON (runs whose output folders are gone) for
the runs not given again, with the figures measured then: bytes and quality are the same on any
day, so they join the size front; decode and prefill speeds are only as comparable as the two
sessions' machines and builds (the dense model, timed in both, says how far apart), so the speed
front and picture leave them out.

Writes JSON, prints a Markdown table, and draws KL against bytes and against decode
speed with the Pareto front (no other artifact both smaller or faster and closer) marked.
`--speed-only` re-times the artifacts without the quality pass (minutes instead of half an
hour) and prints each one's speeds against the first run's file of the same format; it
writes nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.edge_export import NEW_TOKENS, PREFILL, PROMPT, prefill, round_robin  # noqa: E402
from benchmarks.structured_peers import OUT as PEERS, chat_answers, chat_kl  # noqa: E402
from compressor import load_model  # noqa: E402
from compressor.data import load_texts, tokenize  # noqa: E402
from compressor.folder import directory_bytes, onnx_bytes  # noqa: E402
from compressor.generation import OnnxDecoder, TorchDecoder, generate  # noqa: E402

ONNX = ("onnx", "onnx-int8", "onnx-int4")


def _quality(entry: dict | None) -> dict:
    """PPL, KL to the dense model and top-1 agreement with it, of a report's perplexity dict or an export's entry."""
    if not entry:
        return {"ppl": None, "kl": None, "top1": None}
    ppl = entry.get("perplexity", entry)
    return {"ppl": ppl.get("ppl"), "kl": ppl.get("kl"), "top1": ppl.get("agreement")}  # top-1 agreement with dense


def artifacts(label: str, out: Path) -> list[dict]:
    """The artifacts of one run with their bytes and measured quality."""
    if (out / "report.json").is_file():
        report = json.loads((out / "report.json").read_text())
        exported, torch_quality = report.get("export", {}), _quality(report["perplexity"]["pruned"])
        if (out / "export.json").is_file():  # files written afterwards by `tapc export` on OUT/model
            exported = {**exported, **json.loads((out / "export.json").read_text())}
        sparsity = report["sparsity"]["prunable_sparsity"]
    else:  # the dense model exported by `tapc export --dataset`: its drift from itself is none
        exported = json.loads((out / "export.json").read_text())
        torch_quality = {"ppl": exported["perplexity"]["ppl"], "kl": 0.0, "top1": 1.0}
        sparsity = 0.0
    model_dir = out / "model" if (out / "model").is_dir() else Path(exported["model"])
    rows = [{"run": label, "artifact": "safetensors", "path": str(model_dir), "bytes": directory_bytes(model_dir),
             "sparsity": sparsity, **torch_quality}]
    for name in ONNX:
        if (out / name / "model.onnx").is_file():
            rows.append({"run": label, "artifact": name, "path": str(out / name), "sparsity": sparsity,
                         "bytes": onnx_bytes(out / name / "model.onnx"),
                         **(_quality(exported.get(name.removeprefix("onnx-"))) if name != "onnx" else torch_quality)})
    for kind, entry in ({} if "error" in exported.get("gguf", {}) else exported.get("gguf", {})).items():
        rows.append({"run": label, "artifact": f"gguf-{kind}", "path": str(out / entry["path"]), "sparsity": sparsity,
                     "bytes": entry["bytes"], **_quality(entry)})
    return rows


def with_earlier(rows: list[dict], earlier: list[dict]) -> list[dict]:
    """`rows` with the `earlier` rows of runs not among them, after the first run's (the dense model's) rows."""
    runs = [r["run"] for r in rows]
    kept = [{**r, "earlier": True} for r in earlier if r["run"] not in runs]
    first = runs.count(runs[0])
    return rows[:first] + kept + rows[first:]


def _model(row: dict):
    """The artifact as something perplexity() and chat_kl() can run: PyTorch, onnxruntime, or a GGUF read back
    (dequantized) by transformers."""
    if row["artifact"] in ONNX:
        return OnnxDecoder(Path(row["path"]) / "model.onnx")
    return load_model(row["path"]).model.eval()


def measure_quality(rows: list[dict], test: torch.Tensor, seq_len: int, max_tokens: int, conversations) -> None:
    """Held-out chat KL of every artifact, and KL to the first run's PyTorch model (the dense one) for those that
    have none from their run."""
    from compressor.evaluate import perplexity

    reference = load_model(rows[0]["path"]).model.eval()
    for row in rows:
        model = _model(row)
        if row["kl"] is None:
            result = perplexity(model, test, seq_len, max_tokens=max_tokens, reference=reference)
            row.update(ppl=result.ppl, kl=result.kl, top1=result.agreement, kl_measured_here=True)
        row["chat_kl"] = chat_kl(model, reference, conversations)
        del model


def llama_bench(binary: str, path: str, prompt: int, new: int, threads: int) -> float:
    """Tokens/s of one llama-bench test of a GGUF file: a `prompt`-token prefill or `new` generated tokens."""
    done = subprocess.run([binary, "-m", path, "-p", str(prompt), "-n", str(new), "-t", str(threads), "-r", "1",
                           "-o", "json"], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)[0]["avg_ts"]


def measure_speed(rows: list[dict], test: torch.Tensor, tokenizer, repeats: int, llama: str | None = None) -> None:
    """Decode and prefill tokens/s of every PyTorch and ONNX artifact, and of every GGUF file given llama.cpp's
    `llama-bench`, round-robin."""
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    long = test[None, :PREFILL]
    threads = torch.get_num_threads()
    decode, prefills = {}, {}
    for row in rows:
        key = f"{row['run']}:{row['artifact']}"
        if row["artifact"] == "safetensors" or row["artifact"] in ONNX:
            d = (TorchDecoder(load_model(row["path"]).model) if row["artifact"] == "safetensors"
                 else OnnxDecoder(Path(row["path"]) / "model.onnx"))
            decode[key] = lambda d=d: generate(d, prompt, NEW_TOKENS).tokens_per_second
            prefills[key] = lambda d=d: prefill(d, long)
        elif llama and row["artifact"].startswith("gguf-"):
            decode[key] = lambda p=row["path"]: llama_bench(llama, p, 0, NEW_TOKENS, threads)
            prefills[key] = lambda p=row["path"]: llama_bench(llama, p, PREFILL, 0, threads)
    decode, prefills = round_robin(decode, repeats), round_robin(prefills, repeats)
    for row in rows:
        key = f"{row['run']}:{row['artifact']}"
        row["decode_tps"], row["prefill_tps"] = decode.get(key), prefills.get(key)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def speedups(rows: list[dict]) -> str:
    """Decode and prefill tokens/s of every artifact, and their ratio to the first run's artifact of the same
    format (the dense model's)."""
    first = {r["artifact"]: r for r in rows if r["run"] == rows[0]["run"]}
    lines = ["| run | artifact | decode tok/s | prefill tok/s | decode × first | prefill × first |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    speeds = ("decode_tps", "prefill_tps")
    for r in rows:
        base = first.get(r["artifact"], {})
        cells = [_fmt(r[k], f) for k, f in zip(speeds, (".1f", ".0f"))]
        cells += [_fmt(r[k] / base[k] if r[k] and base.get(k) else None, ".3f") for k in speeds]
        lines.append(f"| {r['run']} | {r['artifact']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


FRONTS = {"size": ("bytes", lambda a, b: a <= b), "speed": ("decode_tps", lambda a, b: a >= b)}  # axis, better


def candidates(rows: list[dict], front: str) -> list[dict]:
    """The rows a front is drawn from: every row for size; for speed, the rows timed in this session (another
    session's machine and builds are not comparable; bytes and KL are)."""
    return rows if front == "size" else [r for r in rows if not r.get("earlier")]


def pareto(rows: list[dict], axis: str, better) -> list[dict]:
    """Rows no other row beats on `axis` (by `better`) at an equal or lower KL."""
    known = [r for r in rows if r.get("kl") is not None and r.get(axis) is not None]
    return [r for r in known if not any(o is not r and o["kl"] <= r["kl"] and better(o[axis], r[axis])
                                        and (o["kl"], o[axis]) != (r["kl"], r[axis]) for o in known)]


def markdown(rows: list[dict]) -> str:
    """The table; "front": on the Pareto front of KL against size, against decode speed (of the rows timed in
    this session), or both; "†": a row kept from an earlier results file."""
    fronts = {name: pareto(candidates(rows, name), *FRONTS[name]) for name in FRONTS}
    lines = ["| run | artifact | sparsity | MB | decode tok/s | prefill tok/s | PPL | KL to dense | top-1 | chat KL "
             "| front |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        front = ", ".join(name for name, on in fronts.items() if any(o is r for o in on))
        run = r["run"] + (" †" if r.get("earlier") else "")  # its speeds measured in an earlier session
        lines.append(f"| {run} | {r['artifact']} | {r['sparsity']:.1%} | {r['bytes'] / 1e6:.1f} | "
                     f"{_fmt(r.get('decode_tps'), '.1f')} | {_fmt(r.get('prefill_tps'), '.0f')} | "
                     f"{_fmt(r['ppl'], '.2f')} | {_fmt(r['kl'], '.3f')} | {_fmt(r['top1'], '.1%')} | "
                     f"{_fmt(r.get('chat_kl'), '.3f')} | {front} |")
    return "\n".join(lines)


MARKERS = {"safetensors": "o", "onnx": "s", "onnx-int8": "^", "onnx-int4": "v"}  # GGUF files: "D"


def plot(rows: list[dict], path: Path) -> None:
    """KL against MB and against decode tokens/s (the rows timed in this session): a colour per run, a marker per
    artifact, the fronts dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    runs = list(dict.fromkeys(r["run"] for r in rows))
    tab20 = plt.get_cmap("tab20").colors  # dark and light shades in pairs; grey (14, 15) marks the artifacts
    palette = [c for i, c in enumerate(tab20[::2] + tab20[1::2]) if i not in (7, 17)]
    colour = {run: palette[i % len(palette)] for i, run in enumerate(runs)}
    marker = lambda artifact: MARKERS.get(artifact, "D")  # noqa: E731
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, name, label in ((axes[0], "size", "MB on disk"), (axes[1], "speed", "decode tokens/s")):
        axis, better = FRONTS[name]
        known = [r for r in candidates(rows, name) if r.get("kl") is not None and r.get(axis) is not None]
        scale = 1e6 if axis == "bytes" else 1
        for r in known:
            ax.scatter(r[axis] / scale, r["kl"], s=24, color=colour[r["run"]], marker=marker(r["artifact"]))
        front = sorted(pareto(known, axis, better), key=lambda r: r[axis])
        ax.plot([r[axis] / scale for r in front], [r["kl"] for r in front], "k--", linewidth=1)
        ax.set_xlabel(label)
        ax.set_ylabel("KL to the dense model (nats/token)")
    artifacts = list(dict.fromkeys(r["artifact"] for r in rows))
    handles = ([Line2D([], [], color=colour[run], marker="o", linestyle="", label=run) for run in runs]
               + [Line2D([], [], color="grey", marker=marker(a), linestyle="", label=a) for a in artifacts]
               + [Line2D([], [], color="k", linestyle="--", label="Pareto front")])
    fig.legend(handles=handles, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=DIR",
                        help="a run's output folder; the first is the dense model")
    parser.add_argument("--dataset", default="../shared/data/wikitext2-local")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=512, help="evaluation windows (the runs' protocol)")
    parser.add_argument("--eval-tokens", type=int, default=20480, help="first N test tokens (the runs' protocol)")
    parser.add_argument("--chat", default=str(PEERS), help="the folder of structured_peers' chat.json (the dense "
                        "model's answers to held-out chat prompts, made there if missing)")
    parser.add_argument("--llama-bench", help="llama.cpp's llama-bench: measure the GGUF files' speed with it (not a "
                        "tapc dependency; build llama.cpp with `cmake --build build --target llama-bench`; where a VM "
                        "does not grant AMX, a GGML_NATIVE build stops with SIGILL on prefill: configure with "
                        "-DGGML_NATIVE=OFF and the CPU's AVX flags)")
    parser.add_argument("--keep", metavar="RESULTS", help="an earlier results JSON whose rows of runs not given here "
                        "join the table, the picture and the size front, with the figures measured then")
    parser.add_argument("--results", default="benchmarks/results/frontier.json")
    parser.add_argument("--speed-only", action="store_true", help="time the artifacts only and print their speeds "
                        "against the first run's; writes nothing")
    args = parser.parse_args()
    earlier = json.loads(Path(args.keep).read_text()) if args.keep else {"rows": []}  # read before an hour's work
    rows = []
    for spec in args.run:
        label, _, folder = spec.partition("=")
        rows += artifacts(label, Path(folder))
    first = next(r for r in rows if r["artifact"] == "safetensors")
    tokenizer = load_model(first["path"]).tokenizer
    test = tokenize(tokenizer, load_texts(args.dataset).texts["test"])
    measure_speed(rows, test, tokenizer, args.repeats, args.llama_bench)  # first: a runtime that fails, fails early
    if args.speed_only:
        print(speedups(rows))
        return
    conversations = chat_answers(load_model(first["path"]).model.eval(), tokenizer, Path(args.chat))
    measure_quality(rows, test, args.seq_len, args.eval_tokens, conversations)
    rows = with_earlier(rows, earlier["rows"])
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"rows": rows, "protocol": {"decode": f"greedy, {NEW_TOKENS} new tokens after "
                                   f"{PROMPT!r}, batch 1", "prefill": f"{PREFILL} tokens", "repeats": args.repeats,
                                   "threads": torch.get_num_threads(), "gguf": args.llama_bench and
                                   f"llama-bench -p {PREFILL} / -n {NEW_TOKENS}, one run a turn"},
                                   "earlier": earlier.get("protocol")}, indent=1) + "\n")
    plot(rows, results.with_suffix(".png"))
    print(markdown(rows))


if __name__ == "__main__":
    main()
