"""Long runs: checkpoints, resume after a stop or a kill, roll-back after a non-finite loss."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compressor import checkpoint, compress, load_recipe
from compressor.errors import JobError
from compressor.pruner import Pruner
from compressor.recipe import Recipe
from compressor.train import Interrupted, Trainer, build_optimizer, run

from .conftest import build_model

REPO = Path(__file__).resolve().parents[1]


def _tensors(out: Path) -> dict:
    return load_file(out / "model" / "model.safetensors")


def _same(a: Path, b: Path) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _differences(a: Path, b: Path, above: float) -> list[str]:
    """The tensors of two outputs whose values differ by more than `above`: how many values, the largest gap."""
    ta, tb = _tensors(a), _tensors(b)
    if ta.keys() != tb.keys():
        return [f"tensor names differ: {sorted(ta.keys() ^ tb.keys())}"]
    gaps = {k: (ta[k].double() - tb[k].double()).abs() for k in ta}
    return [f"{k}: {int((gap > above).sum())} of {gap.numel()} values, largest gap {gap.max().item():.3g}"
            for k, gap in gaps.items() if gap.max() > above]


def test_stop_then_resume_equals_uninterrupted_run(gpt2_dir, data_dir, quick_recipe_file, tmp_path):
    recipe = load_recipe(quick_recipe_file, {"data.dataset": str(data_dir), "train.checkpoint_every": 0})
    compress(str(gpt2_dir), recipe, tmp_path / "whole")
    polls = iter(range(100))
    with pytest.raises(Interrupted, match="--resume") as info:
        compress(str(gpt2_dir), recipe, tmp_path / "cut", stop=lambda: next(polls) == 4)
    assert info.value.step == 5 and info.value.exit_code == 130
    assert not (tmp_path / "cut").exists() and (tmp_path / "cut.checkpoint" / "checkpoint.pt").exists()
    result = compress(str(gpt2_dir), recipe, tmp_path / "cut", resume=True)
    assert result.report["train"]["resumed_from"] == 5
    assert _same(tmp_path / "whole", tmp_path / "cut")
    assert not (tmp_path / "cut.checkpoint").exists()  # removed once the output is complete


def _cli_args(gpt2_dir, data_dir, recipe_file, out, *extra):
    return [sys.executable, "-m", "compressor", "compress", str(gpt2_dir), "--recipe", str(recipe_file),
            "--dataset", str(data_dir), "--out", str(out), "--steps", "60", *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _start_and_signal(args, sig, at: str = "step 18/60") -> subprocess.CompletedProcess:
    """Run `args` and send `sig` once its progress log reaches `at` (a step count, not a time: the signal
    lands mid-run on a fast machine and on a slow one)."""
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if at in line:
            proc.send_signal(sig)
            break
    stdout, rest = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(args, proc.returncode, stdout, "".join(seen) + rest)


@pytest.fixture(scope="module")
def uninterrupted(gpt2_dir, data_dir, tmp_path_factory):
    """The same job as the killed runs, run once without interruption, in a process of its own as they are
    (nothing the test process did before can reach it)."""
    folder = tmp_path_factory.mktemp("whole")
    recipe = _write_recipe(folder / "tiny.yaml")
    result = subprocess.run(_cli_args(gpt2_dir, data_dir, recipe, folder / "out"), env=_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return folder / "out", recipe


def _write_recipe(path: Path) -> Path:
    path.write_text(
        "prune: {sparsity: 0.5, prune_every: 2, warmup: 0.1, tau: 0.2, final: 0.6}\n"
        "optim: {lr: 1.0e-3}\nta: {lr: 1.0e-2}\n"
        "train: {batch_size: 2, eval_every: 0}\ndata: {seq_len: 32}\neval: {max_tokens: 300}\n"
    )
    return path


@pytest.mark.slow  # a second process, started and killed: ~25 s each
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_process_resumes_to_the_same_result(sig, gpt2_dir, data_dir, uninterrupted, tmp_path):
    whole, quick_recipe_file = uninterrupted
    out = tmp_path / "run"
    ckpt = checkpoint.checkpoint_dir(out) / "checkpoint.pt"
    args = _cli_args(gpt2_dir, data_dir, quick_recipe_file, out, "--checkpoint-every", "3")
    done = _start_and_signal(args, sig)
    if sig == signal.SIGTERM:
        assert done.returncode == 130, done.stderr
        assert "--resume" in done.stderr.strip().splitlines()[-1]
    else:
        assert done.returncode == -signal.SIGKILL
    assert not out.exists() and ckpt.exists()
    resumed = subprocess.run(args + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    # Bit-identity after a resume is checked in one process (test_stop_then_resume_equals_uninterrupted_run).
    # Across processes, a resumed run on 2 threads has ended a few float32 ulps away from the uninterrupted
    # one (gaps up to 1e-7 after 40 steps, in about one run in ten; cause not found). A piece of state lost
    # on the way (Adam's moments, the RNG, the Taylor scores or the loss history, each dropped from a step-18
    # checkpoint) leaves gaps of 0.04, a mask choice changed. 1e-5 lies 100 times above the first.
    gaps = _differences(out, whole, above=1e-5)
    assert not gaps, "\n".join(["resumed output differs from the uninterrupted run:", *gaps,
                                "killed run:", done.stderr[-1500:], "resumed run:", resumed.stderr[-1500:]])


def _trainer(tmp_path, max_recoveries=3):
    recipe = Recipe.model_validate({
        "prune": {"sparsity": 0.5, "prune_every": 2, "warmup": 0.1, "tau": 0.2, "final": 0.6},
        "optim": {"lr": 1e-3}, "ta": {"lr": 1e-2},
        "train": {"steps": 10, "batch_size": 2, "eval_every": 0, "max_recoveries": max_recoveries},
    })
    model = build_model("gpt2", 97).train()
    windows = torch.randint(97, (16, 16), generator=torch.Generator().manual_seed(0))
    pruner = Pruner(recipe.prune, 10).prepare(model)
    trainer = Trainer(model, pruner, build_optimizer(model, recipe, pruner, None), windows, windows[:2],
                      recipe, 10, torch.device("cpu"))
    folder = tmp_path / "ckpt"
    save = lambda t: checkpoint.save(folder, t.state_dict())  # noqa: E731
    restore = lambda t: t.load_state_dict(checkpoint.load(folder))  # noqa: E731
    save(trainer)
    return trainer, save, restore


def _poison(model, calls: set[int]):
    """Make the loss NaN on the given forward calls (1-based)."""
    count = [0]

    def hook(module, args, output):
        count[0] += 1
        if count[0] in calls:
            output.loss = output.loss * float("nan")
        return output

    model.register_forward_hook(hook)


def test_non_finite_loss_rolls_back_and_lowers_step_size(tmp_path):
    trainer, save, restore = _trainer(tmp_path)
    lr0 = trainer.scheduler.base_lrs[0]
    _poison(trainer.model, {4})
    log = run(trainer, checkpoint=save, restore=restore)
    assert log.recoveries == [{"step": 4, "restored_to": 0}]
    assert trainer.scheduler.base_lrs[0] == pytest.approx(lr0 / 2) and trainer.step == 10
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_non_finite_loss_gives_up_after_max_recoveries(tmp_path):
    trainer, save, restore = _trainer(tmp_path, max_recoveries=2)
    _poison(trainer.model, set(range(1, 1000)))
    with pytest.raises(JobError, match="after 2 recoveries"):
        run(trainer, checkpoint=save, restore=restore)


def test_bf16_mixed_precision_runs_on_cpu(gpt2_dir, data_dir, quick_recipe_file, tmp_path):
    recipe = load_recipe(quick_recipe_file, {"data.dataset": str(data_dir), "train.mixed_precision": "bf16",
                                             "train.steps": 4})
    result = compress(str(gpt2_dir), recipe, tmp_path / "bf16")
    assert result.report["recipe"]["train"]["mixed_precision"] == "bf16"
    assert torch.isfinite(torch.tensor(result.report["perplexity"]["pruned"]["ppl"]))
    assert all(v.dtype == torch.float32 for v in _tensors(tmp_path / "bf16").values())  # weights stay fp32
