"""Two CPU processes (gloo) give the masks and perplexity of one process with the same total batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import build_model, free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("start,loss", [("dense", "ce"), ("sparsegpt", "ce+kd")])
def test_two_processes_match_one(no_dropout_model, data_dir, quick_recipe_file, tmp_path, start, loss):
    """Also with distillation: every process runs the teacher on its share of the batch."""
    args = ["-m", "compressor", "compress", str(no_dropout_model), "--recipe", str(quick_recipe_file),
            "--dataset", str(data_dir), "--json", "--device", "cpu", "--start-from", start, "--loss", loss]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(free_port())]
    double = subprocess.run([*launcher, *args, "--out", str(tmp_path / "two")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = json.loads(single.stdout), json.loads(double.stdout)  # rank 1 prints nothing
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["perplexity"]["pruned"]["ppl"] == pytest.approx(one["perplexity"]["pruned"]["ppl"], rel=1e-3)
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    for layer in one["sparsity"]["layers"]:
        assert torch.equal(a[layer["name"]] == 0, b[layer["name"]] == 0), layer["name"]
