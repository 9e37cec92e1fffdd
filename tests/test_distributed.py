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

from compressor.errors import UsageError
from compressor.pipeline import compress

from .conftest import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
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
    # Two processes average gradients in another order: <= 2.4e-8 apart, equal masks (AVX-512 and AVX2/SSE kernels).
    assert two["perplexity"]["pruned"]["ppl"] == pytest.approx(one["perplexity"]["pruned"]["ppl"], rel=1e-3)
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    for layer in one["sparsity"]["layers"]:
        assert torch.equal(a[layer["name"]] == 0, b[layer["name"]] == 0), layer["name"]


def test_compress_ends_the_process_group_it_started_and_only_that(monkeypatch, tmp_path):
    """Left to the interpreter's exit, a gloo group aborted one process in five (SIGABRT) after a finished run.

    A one-process group stands in for the launcher's: `compress` fails on the missing model after starting it.
    """
    start = torch.distributed.init_process_group

    def one_process_group(backend, **_):
        start(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "init_process_group", one_process_group)
    with pytest.raises(UsageError, match="does not exist"):
        compress(str(tmp_path / "missing"), out=tmp_path / "out")
    assert not torch.distributed.is_initialized()
    one_process_group("gloo")  # a caller's own group stays the caller's
    try:
        with pytest.raises(UsageError, match="does not exist"):
            compress(str(tmp_path / "missing"), out=tmp_path / "out")
        assert torch.distributed.is_initialized()
    finally:
        torch.distributed.destroy_process_group()
