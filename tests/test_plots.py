"""The plots and the Markdown report, drawn from made-up runs of known shape (no training)."""

from __future__ import annotations

import math
import struct
import sys
from pathlib import Path

import pytest

from compressor.markdown import render_markdown
from compressor.plots import PLOT_FILES, layer_block, layer_kind, smooth, write_plots
from compressor.recipe import Recipe

GPT2_LAYERS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
LLAMA_LAYERS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def fake_run(blocks=2, steps=60, prefix="transformer.h", layers=GPT2_LAYERS, target=0.3) -> tuple[dict, dict]:
    """A report and a training log with the structure `tapc compress` writes."""
    recipe = Recipe().model_dump(mode="json")
    recipe["prune"]["sparsity"] = target
    names = [f"{prefix}.{b}.{layer}.weight" for b in range(blocks) for layer in layers]
    rows = []
    for i, name in enumerate(names):
        params = 4096
        zeros = round(params * min(0.95, target * (0.5 + i / len(names))))
        rows.append({"name": name, "shape": [64, 64], "params": params, "zeros": zeros, "sparsity": zeros / params})
    pruned_params = sum(r["params"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    report = {
        "tool": "tapc", "version": "0.1.0",
        "model": {"spec": "./tiny", "kind": "directory", "path": "/tmp/tiny", "parameters": 200_000,
                  "architecture": "GPT2LMHeadModel"},
        "dataset": {"source": "local directory", "notes": [], "tokens": {"train": 1000, "validation": 100, "test": 100}},
        "recipe": recipe, "device": "cpu", "platform": {"python": "3.11", "torch": "2.13.0"}, "seq_len": 32,
        "perplexity": {"dense": {"ppl": 30.0, "nll": math.log(30), "tokens": 581, "protocol": "windows of 32"},
                       "pruned": {"ppl": 33.0, "nll": math.log(33), "tokens": 581, "protocol": "windows of 32"},
                       "increase": 0.1},
        "sparsity": {"layers": rows, "prunable_params": pruned_params, "prunable_zeros": zeros,
                     "prunable_sparsity": zeros / pruned_params, "total_params": 200_000, "total_zeros": zeros,
                     "total_sparsity": zeros / 200_000, "nonzero_params": 200_000 - zeros},
        "train": {"steps": steps, "tokens": steps * 64, "seconds": 12.5, "mask_updates": 0, "ta": "off"},
        "seconds": 20.0, "output": "out",
    }
    updates = [{"step": s, "target": target * s / (steps * 0.7), "alpha": 0.9, "masked": 0, "pruned": 100,
                "regrown": 3, "sparsity": min(target, target * s / (steps * 0.7))}
               for s in range(6, int(steps * 0.7) + 1, 6)]
    sparsity, current = [], 0.0
    for s in range(1, steps + 1):
        current = next((u["sparsity"] for u in updates if u["step"] == s), current)
        sparsity.append(current)
    # The loss jumps after each mask update and comes back: the shape the plot must show.
    loss = [4.0 - s / steps + (0.5 if any(0 < s - u["step"] <= 2 for u in updates) else 0.0)
            for s in range(1, steps + 1)]
    log = {"steps": steps, "tokens": steps * 64, "seconds": 12.5, "loss": loss, "lr": [1e-3] * steps,
           "sparsity": sparsity, "ta_coef": [0.0] * steps,
           "validation": [{"step": 0, "loss": 3.5}, {"step": steps // 2, "loss": 3.7}, {"step": steps, "loss": 3.6}],
           "mask_updates": updates}
    report["train"]["mask_updates"] = len(updates)
    return report, log


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header, after checking the file decodes whole."""
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    with Image.open(path) as image:
        image.verify()
    return struct.unpack(">II", data[16:24])


def assert_sensible_png(path: Path, min_size=(600, 300), max_size=(3200, 1200)) -> None:
    width, height = png_size(path)
    # Pixel counts (figure inches x 120 dpi, set by the code; measured 960-1200 x 576-660), not float sums.
    assert min_size[0] <= width <= max_size[0] and min_size[1] <= height <= max_size[1], (width, height)
    # Something was drawn, not an empty canvas: PNG bytes, measured 50-159 kB; rounding moves pixels, not 5x the bytes.
    assert path.stat().st_size > 10_000


def test_plots_are_valid_images_of_sensible_size(tmp_path):
    report, log = fake_run()
    plots, skipped = write_plots(tmp_path, report, log)
    assert skipped == [] and plots == PLOT_FILES
    for name in PLOT_FILES.values():
        assert_sensible_png(tmp_path / name)


def test_layers_plot_of_a_deep_model_stays_readable(tmp_path):
    # SmolLM2-135M: 30 blocks of 7 matrices. The picture widens with the model, within bounds.
    report, log = fake_run(blocks=30, prefix="model.layers", layers=LLAMA_LAYERS, steps=300)
    assert write_plots(tmp_path, report, log) == (PLOT_FILES, [])
    small_dir = tmp_path / "small"
    small_dir.mkdir()
    write_plots(small_dir, *fake_run())
    small, _ = png_size(small_dir / "layers.png")
    wide, _ = png_size(tmp_path / "layers.png")
    assert small < wide <= 24 * 120  # pixel widths: 8 and 2 + 0.09 * 210 inches (capped at 24) x 120 dpi: 960, 2508
    assert_sensible_png(tmp_path / "training.png")


def test_without_matplotlib_plots_are_skipped_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    report, log = fake_run()
    plots, skipped = write_plots(tmp_path, report, log)
    assert plots == {} and len(skipped) == 1
    assert "matplotlib is not installed" in skipped[0] and "\n" not in skipped[0]
    assert list(tmp_path.iterdir()) == []


def test_a_broken_plot_costs_only_that_plot(tmp_path):
    report, log = fake_run()
    del log["loss"]
    plots, skipped = write_plots(tmp_path, report, log)
    assert plots == {"layers": "layers.png"}
    assert len(skipped) == 1 and skipped[0].startswith("training.png skipped: KeyError")


def test_markdown_report_names_the_plots_and_every_layer(tmp_path):
    report, log = fake_run()
    plots, _ = write_plots(tmp_path, report, log)
    page = render_markdown(report, log, plots)
    assert page.startswith("# tiny pruned to 30% sparsity")
    assert "](training.png)" in page and "](layers.png)" in page
    assert "30.000 dense → 33.000 pruned (+10.00%)" in page
    for layer in report["sparsity"]["layers"]:
        assert f"`{layer['name']}`" in page
    assert f"{len(log['mask_updates'])} mask updates" in page
    # Every table row has as many cells as its header.
    table = [line for line in page.splitlines() if line.startswith("| ")]
    assert len({line.count(" | ") for line in table}) == 1


def test_markdown_report_without_plots_says_why():
    report, log = fake_run()
    page = render_markdown(report, log, {}, ["plots skipped: matplotlib is not installed"])
    assert ".png" not in page and "> plots skipped: matplotlib is not installed" in page


@pytest.mark.parametrize("name,kind,block,short", [
    ("transformer.h.3.attn.c_attn.weight", "attention", 3, "attn.c_attn"),
    ("transformer.h.3.attn.c_proj.weight", "attention", 3, "attn.c_proj"),
    ("transformer.h.11.mlp.c_proj.weight", "mlp", 11, "mlp.c_proj"),
    ("model.layers.0.self_attn.q_proj.weight", "attention", 0, "self_attn.q_proj"),
    ("model.layers.29.mlp.down_proj.weight", "mlp", 29, "mlp.down_proj"),
    ("model.decoder.layers.2.fc1.weight", "mlp", 2, "fc1"),
    ("proj.weight", "other", None, "proj"),
])
def test_layer_names(name, kind, block, short):
    assert layer_kind(name) == kind
    assert layer_block(name) == (block, short)


def test_smoothing_is_causal_and_unbiased():
    # Python float64 scalar arithmetic, the same on any CPU: ~1e-16 from exact, far below approx's rel=1e-6.
    assert smooth([2.0, 2.0, 2.0], 5) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0 at the start
    jump = smooth([1.0] * 5 + [3.0] * 5, 4)
    # float64 scalars again (~1e-16 from exact); the rise does not show before it happens.
    assert jump[:5] == pytest.approx([1.0] * 5)
    assert 1.0 < jump[5] < 3.0 and jump[-1] > jump[5]  # float64: measured 1.84 and 2.86, far from every bound
