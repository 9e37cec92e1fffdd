"""FSDP2 (`--parallel fsdp`, two CPU processes over gloo) against one process, and its sharded checkpoints."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from compressor import checkpoint, sharding
from compressor import distributed as dist
from compressor.errors import UsageError
from compressor.pruner import Pruner, global_masks
from compressor.recipe import PruneConfig

from .conftest import REPO, build_model, free_port

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _launcher() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port())]


def _run(args, out, two: bool) -> dict:
    done = subprocess.run([*(_launcher() if two else [sys.executable]), *args, "--out", str(out)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)  # rank 1 prints nothing


@pytest.mark.slow
@pytest.mark.parametrize("kind,extra", [("llama", ["--loss", "ce"]),
                                        ("gpt2", ["--loss", "ce+kd", "--start-from", "sparsegpt", "--pattern", "2:4"])],
                         ids=["llama-ce", "gpt2-sparsegpt-2:4-ce+kd"])
def test_fsdp_matches_one_process(kind, extra, no_dropout_model, tokenizer, data_dir, quick_recipe_file, tmp_path):
    if kind == "llama":
        model = build_model("llama", len(tokenizer))
        model.save_pretrained(tmp_path / "llama")
        tokenizer.save_pretrained(tmp_path / "llama")
    folder = tmp_path / "llama" if kind == "llama" else no_dropout_model
    args = ["-m", "compressor", "compress", str(folder), "--recipe", str(quick_recipe_file), "--dataset",
            str(data_dir), "--json", "--device", "cpu", "--parallel", "fsdp", *extra]
    one, two = _run(args, tmp_path / "one", two=False), _run(args, tmp_path / "two", two=True)
    assert (one["processes"], one["parallel"]) == (1, None) and (two["processes"], two["parallel"]) == (2, "fsdp")
    # Two processes sum gradients in another order: <= 1.3e-8 apart, equal masks (AVX-512 and AVX2/SSE kernels alike).
    assert two["perplexity"]["pruned"]["ppl"] == pytest.approx(one["perplexity"]["pruned"]["ppl"], rel=1e-3)
    log_one, log_two = (json.loads((tmp_path / r / "training_log.json").read_text()) for r in ("one", "two"))
    total = one["sparsity"]["prunable_params"]
    assert len(log_one["mask_updates"]) == len(log_two["mask_updates"]) >= 3  # counts, set by the schedule
    for a, b in zip(log_one["mask_updates"], log_two["mask_updates"]):  # after every update
        assert a["masked"] == b["masked"]  # exactly the target count
        # Counts, measured equal; 1e-4 (7-10 weights) for a near-tie at the threshold that summation order flips.
        assert abs(a["pruned"] - b["pruned"]) <= 1e-4 * total and abs(a["regrown"] - b["regrown"]) <= 1e-4 * total
    for a, b in zip(log_one["ta_coef"], log_two["ta_coef"]):  # the same TA step on every step
        assert b == pytest.approx(a, rel=1e-5)  # loss and ||g|| summed otherwise: measured <= 1.7e-7 relative
    ta, tb = load_file(tmp_path / "one" / "model" / "model.safetensors"), load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert ta.keys() == tb.keys()
    agree = sum(int(((ta[l["name"]] == 0) == (tb[l["name"]] == 0)).sum()) for l in one["sparsity"]["layers"])
    assert agree >= 0.9999 * total  # a count: measured every mask entry equal; 0.01% for near-ties
    assert two["sparsity"]["prunable_sparsity"] == pytest.approx(0.5, abs=1e-6)  # counts: round(0.5 n) of n zeros


@pytest.mark.slow
def test_fsdp_run_stopped_by_sigterm_resumes_to_the_same_weights(no_dropout_model, data_dir, quick_recipe_file,
                                                                 tmp_path):
    args = ["-m", "compressor", "compress", str(no_dropout_model), "--recipe", str(quick_recipe_file), "--dataset",
            str(data_dir), "--device", "cpu", "--parallel", "fsdp", "--steps", "120", "--checkpoint-every", "3"]
    _run([*args, "--json"], tmp_path / "whole", two=True)
    out = tmp_path / "cut"
    ckpt = checkpoint.checkpoint_dir(out)
    proc = subprocess.Popen([*_launcher(), *args, "--out", str(out)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # a checkpoint past step 0: training is under way
        if (ckpt / "checkpoint.pt").exists() and checkpoint.load(ckpt)["step"] > 0:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # to the launcher, which passes it on to both processes
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and not out.exists(), stderr[-2000:]
    saved = checkpoint.load(ckpt)
    assert saved["shards"] == 2 and 0 < saved["step"] < 120  # step numbers (timing, not rounding): measured 4
    assert sorted(p.name for p in ckpt.glob("shard-*")) == [f"shard-{saved['step']:08d}-rank{r}.pt" for r in (0, 1)]
    resumed = _run([*args, "--json", "--resume"], out, two=True)
    assert resumed["train"]["resumed_from"] == saved["step"]
    a, b = load_file(tmp_path / "whole" / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not ckpt.exists()


def test_sharded_checkpoint_needs_the_same_process_count(tmp_path):
    with pytest.raises(UsageError, match="written by 2 processes.*resume with 2"):
        checkpoint.trainer_state(tmp_path, {"step": 3, "shards": 2})


def test_nm_groups_may_not_straddle_two_processes(monkeypatch):
    pruner = Pruner(PruneConfig(sparsity=0.5, pattern="2:4"), 1).prepare(build_model("gpt2", 97))
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    sharding.check_pattern(pruner)  # 64 and 256 rows: 32 and 128 a process, whole groups of 4
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    with pytest.raises(UsageError, match="straddle"):
        sharding.check_pattern(pruner)


def _sharded_masks(rank: int, world: int, port: int, scores, k: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        shards = [s.chunk(world)[rank] for s in scores]  # FSDP2's split: rows, process 0 first
        # As lists: a tensor would go through shared memory, gone once this process exits.
        results.put((rank, [m.tolist() for m in global_masks(shards, k, seed=5, sharded=True)]))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 77])
def test_sharded_threshold_breaks_ties_as_one_process(k):
    """Many equal scores across both processes' rows: the same masks as one process, to the element."""
    gen = torch.Generator().manual_seed(0)
    scores = [torch.randint(4, (6, 5), generator=gen).float(), torch.randint(4, (9, 4), generator=gen).float(),
              torch.rand(7, 3, generator=gen)]
    ctx = torch.multiprocessing.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_sharded_masks, args=(r, 2, port, scores, k, results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        parts = dict(results.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    expected = global_masks(scores, k)
    for i, mask in enumerate(expected):
        assert torch.equal(torch.tensor(parts[0][i] + parts[1][i]), mask)
    assert sum(int((~m).sum()) for m in expected) == k
