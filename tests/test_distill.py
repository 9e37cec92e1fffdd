"""Distillation from the dense model (train.loss: kd | ce+kd) and the drift every run reports."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from compressor import compress, load_recipe
from compressor.distill import (chat_stream, dense_loss, instruction_prompts, kd_loss, mix_windows, recovery_loss,
                                sampled_ce, teacher_copy)
from compressor.errors import UsageError
from compressor.models import load_model
from compressor.recipe import TrainConfig
from compressor.train import Interrupted, Scoring

from .conftest import build_model, run_cli, save_tiny
from .test_resume import _same


def test_kd_loss_is_the_kl_divergence_at_temperature():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 7) * 3, torch.randn(2, 3, 7) * 3
    for t in (1.0, 2.0):
        p = torch.softmax(teacher / t, -1)
        direct = (p * (p.log() - torch.log_softmax(student / t, -1))).sum(-1).mean() * t * t
        # Two fp32 evaluations of one KL over 7-token rows: a few ulps apart in any order, measured 7e-8 relative.
        assert kd_loss(student, teacher, t).item() == pytest.approx(direct.item(), rel=1e-5)
    assert kd_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)  # every term is exp(t) * (t - t): 0


def test_kd_against_itself_is_zero_with_zero_gradient():
    model = build_model("llama", 64, init_range=0.2).train()
    teacher = teacher_copy(model)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = recovery_loss(model, teacher, ids, TrainConfig(loss="kd"))
    loss.backward()
    # Student and teacher: the same weights, ids and kernels, so bit-equal logits and a KL of exactly 0 on any CPU.
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    grads = [p.grad.abs().max().item() for p in model.parameters() if p.grad is not None]
    # Zero up to the rounding of softmax sums: (sum p - 1) ~ 1e-7 scales each logit's gradient; measured exactly 0.
    assert grads and max(grads) < 1e-6
    ce = F.cross_entropy(model(input_ids=ids).logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    mixed = recovery_loss(model, teacher, ids, TrainConfig(loss="ce+kd", kd_weight=0.25))
    # Two fp32 means of the same 30 CE terms: ulps apart in any summation order, measured <= 6e-8 relative.
    assert mixed.item() == pytest.approx(0.75 * ce.item(), rel=1e-5)  # 0.75 CE + 0.25 * 0
    assert dense_loss(TrainConfig(loss="ce+kd", kd_weight=0.25), 4.0) == 3.0
    assert dense_loss(TrainConfig(loss="kd"), 4.0) == 0.0


def _recipe(quick_recipe_file, data_dir, loss: str, **extra):
    return load_recipe(quick_recipe_file, {"data.dataset": str(data_dir), "train.loss": loss, **extra})


def test_kd_run_reports_drift_and_resumes_exactly(gpt2_dir, data_dir, quick_recipe_file, tmp_path):
    recipe = _recipe(quick_recipe_file, data_dir, "kd", **{"train.checkpoint_every": 0})
    whole = compress(str(gpt2_dir), recipe, tmp_path / "whole").report
    pruned = whole["perplexity"]["pruned"]
    # Measured KL 8e-4 (fp32 noise ~1e-7), agreement 0.955 (26 of 581 top-1 moved), the same with AVX2/SSE kernels.
    assert pruned["kl"] > 0 and 0 < pruned["agreement"] < 1  # pruned to 50%: it moved, but not everywhere
    assert whole["recipe"]["train"]["loss"] == "kd"
    page = (tmp_path / "whole" / "report.md").read_text()
    assert "Drift from the dense model" in page and "distillation from the dense model" in page
    polls = iter(range(100))
    with pytest.raises(Interrupted):
        compress(str(gpt2_dir), recipe, tmp_path / "cut", stop=lambda: next(polls) == 6)
    resumed = compress(str(gpt2_dir), recipe, tmp_path / "cut", resume=True).report
    assert resumed["train"]["resumed_from"] == 7
    assert _same(tmp_path / "whole", tmp_path / "cut")  # the reloaded teacher is the one the run started with
    assert resumed["perplexity"]["pruned"]["kl"] == pruned["kl"]


def test_distillation_keeps_the_model_closer_than_cross_entropy(gpt2_dir, data_dir, quick_recipe_file, tmp_path):
    """On the same budget, KD ends nearer the dense model than CE (here by a wide margin: the
    tiny GPT-2 starts from a near-uniform output that CE pulls towards the text)."""
    result = compress(str(gpt2_dir), _recipe(quick_recipe_file, data_dir, "ce"), tmp_path / "ce")
    kl = {"ce": result.report["perplexity"]["pruned"]["kl"]}
    assert f"KL(dense || pruned) {kl['ce']:.4f}" in result.table  # the summary compress prints
    done = run_cli("compress", gpt2_dir, "--recipe", quick_recipe_file, "--dataset", data_dir, "--out", tmp_path / "kd",
                   "--loss", "kd", "--json")
    assert done.exit_code == 0, done.output
    kl["kd"] = json.loads(done.stdout)["perplexity"]["pruned"]["kl"]
    assert kl["kd"] < kl["ce"] / 2, kl  # measured 8e-4 against 0.041 (0.019x); AVX2/SSE kernels move it < 3e-5
    table = run_cli("compare", tmp_path / "ce", tmp_path / "kd")
    assert table.exit_code == 0, table.output
    assert "KL to dense" in table.output and f"{kl['kd']:.4f}" in table.output
    assert json.loads((tmp_path / "ce" / "report.json").read_text())["perplexity"]["pruned"]["kl"] == kl["ce"]


def test_unknown_loss_is_a_one_line_error(quick_recipe_file):
    with pytest.raises(UsageError, match="train.loss"):
        load_recipe(quick_recipe_file, {"train.loss": "mse"})


def test_self_distillation_mixes_the_dense_models_answers_into_training(gpt2_dir, data_dir, quick_recipe_file,
                                                                       tokenizer, tmp_path):
    prompts = instruction_prompts()
    assert len(prompts) == 64 and len(set(prompts)) == 64
    train, extra = torch.zeros(90, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long)
    mixed = mix_windows(train, extra, 0.25)
    assert len(mixed) == 90 + 30 and mixed[90:].eq(1).all()  # 30 of 120 windows: the share
    chat = tmp_path / "chat-model"
    save_tiny(chat, "llama", tokenizer, init_range=0.2)
    (chat / "tokenizer_config.json").write_text(json.dumps({
        **json.loads((chat / "tokenizer_config.json").read_text()),
        "chat_template": "{% for m in messages %}user: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}"}))
    recipe = _recipe(quick_recipe_file, data_dir, "kd", **{"data.self_distill": 3})
    report = compress(str(chat), recipe, tmp_path / "out").report
    dense = load_model(str(chat))
    stream = chat_stream(dense.model, dense.tokenizer, prompts[:3])  # greedy: the same answers again
    # A token count (453): each prompt's own template tokens alone exceed 5, whatever the greedy answers.
    assert report["dataset"]["tokens"]["self_distill"] == stream.numel() > 3 * 5
    assert any("3 instruction prompts" in note for note in report["dataset"]["notes"])
    # A model without a chat template: a one-line error before anything is trained or written.
    bad = _recipe(quick_recipe_file, data_dir, "kd", **{"data.self_distill": 3})
    with pytest.raises(UsageError, match="chat template"):
        compress(str(gpt2_dir), bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_kd_from_the_dense_model_scores_with_cross_entropy_until_the_first_mask():
    """Before any weight is masked the student is its teacher (KD gradient = rounding noise):
    those steps score with the CE gradient and leave the weights exactly as they were."""
    from compressor.pruner import Pruner
    from compressor.recipe import Recipe
    from compressor.train import Trainer, build_optimizer

    recipe = Recipe.model_validate({
        "prune": {"sparsity": 0.5, "prune_every": 4, "warmup": 0.0, "tau": 0.2, "final": 0.8},
        "optim": {"lr": 1e-3}, "ta": {"lr": 1e-2}, "train": {"steps": 10, "batch_size": 2, "eval_every": 0,
                                                              "loss": "kd"},
    })
    model = build_model("llama", 97, init_range=0.2).train()
    teacher = teacher_copy(model)
    windows = torch.randint(97, (16, 16), generator=torch.Generator().manual_seed(0))
    pruner = Pruner(recipe.prune, 10).prepare(model)
    trainer = Trainer(model, pruner, build_optimizer(model, recipe, pruner, 0.0), windows, windows[:2], recipe, 10,
                      torch.device("cpu"), teacher)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        assert trainer.scoring_plan(trainer.step + 1) is Scoring.SCORE_ONLY
        trainer.train_step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert model.get_input_embeddings().weight.grad is None  # a gradient for the scores: pruned weights only
    # CE, not noise: each layer's top score measured >= 0.018; a KD gradient's rounding noise would be ~1e-8.
    assert trainer.log.loss == [0.0] * 3 and all(s.max() > 1e-3 for s in pruner.scores.values())  # CE, not noise
    trainer.train_step()  # step 4: the first mask
    assert pruner.history and trainer.scoring_plan(trainer.step + 1) is not Scoring.SCORE_ONLY
    trainer.train_step()
    # The KD loss once half the weights are masked: measured 0.69 against fp32 noise ~1e-7.
    assert trainer.log.loss[-1] > 0 and not all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_scores_from_their_own_loss_under_kd_leave_the_training_step_as_it_was(grad_accum):
    """`prune.score_loss: ce` (or `sampled`) with kd: after the first mask, the Taylor scores come from the CE
    gradient on the step's batch (of tokens drawn from the model's prediction): one more backward of the same
    forward, or with micro-batches (grad_accum 2) a forward and backward of their own. Under ce the weights move
    exactly as with scores from the KD loss. `ce` is the default: its recipe leaves it out."""
    from compressor.pruner import Pruner
    from compressor.recipe import Recipe
    from compressor.saliency import get_criterion
    from compressor.train import Trainer, build_optimizer

    windows = torch.randint(97, (16, 16), generator=torch.Generator().manual_seed(0))
    runs = {}
    for score_loss in ("train", "ce", "sampled"):
        recipe = Recipe.model_validate({
            "prune": {"sparsity": 0.5, "prune_every": 2, "warmup": 0.0, "tau": 0.2, "final": 0.8,
                      **({"score_loss": score_loss} if score_loss != "ce" else {})},
            "optim": {"lr": 1e-3}, "ta": {"lr": 1e-2}, "train": {"steps": 10, "batch_size": 2, "eval_every": 0,
                                                                  "loss": "kd", "grad_accum": grad_accum},
        })
        model = build_model("llama", 97, init_range=0.2).train()
        pruner = Pruner(recipe.prune, 10).prepare(model)
        trainer = Trainer(model, pruner, build_optimizer(model, recipe, pruner, 0.0), windows, windows[:2], recipe,
                          10, torch.device("cpu"), teacher_copy(model))
        while not pruner.history:
            trainer.train_step()  # scoring-only steps (CE either way) up to the first mask
        # CE scores beside a KD step: from the same forward pass unless gradients accumulate over batches
        shared_or_own = [Scoring.SHARED_PASS, Scoring.OWN_PASS][grad_accum - 1]
        expected = Scoring.TRAINING if score_loss == "train" else shared_or_own
        assert trainer.scoring_plan(trainer.step + 1) is expected
        # This step's score gradient, on a copy, for the score it should fold in.
        probe, draws = copy.deepcopy(model), trainer.score_generator(trainer.step + 1)
        for micro in range(grad_accum):
            ids = trainer.batches(trainer.step * grad_accum + micro)
            own = sampled_ce(probe(input_ids=ids).logits, draws) if score_loss == "sampled" else None
            (probe(input_ids=ids, labels=ids).loss if own is None else own).div(grad_accum).backward()
        old = {n: s.clone() for n, s in pruner.scores.items()}
        embedding_grads = []  # the scoring backward is taken for the pruned weights alone
        hook = model.get_input_embeddings().weight.register_hook(embedding_grads.append)
        trainer.train_step()
        hook.remove()
        assert len(embedding_grads) == grad_accum  # the training backward's, one per micro-batch
        runs[score_loss] = ({n: p.detach().clone() for n, p in model.named_parameters()},
                            {n: s.clone() for n, s in pruner.scores.items()}, old, probe, trainer.log.tokens)
    w_train, s_train, _, _, tokens_train = runs["train"]
    criterion, beta = get_criterion("taylor"), 0.9
    for score_loss in ("ce", "sampled"):
        weights, scores, old, probe, tokens = runs[score_loss]
        if score_loss == "ce":  # sampled scores chose another first mask: their weights differ from here on
            assert all(torch.equal(w_train[n], weights[n]) for n in w_train)  # the training step itself is unchanged
        assert tokens == tokens_train  # the scoring pass does not count as training tokens
        assert any(not torch.equal(s_train[n], scores[n]) for n in scores)
        grads = dict(probe.named_parameters())
        for name, score in scores.items():
            param = name + ".parametrizations.weight.original"
            w, g = grads[param].detach(), grads[param].grad
            # The same gradient both ways; lerp_ and this formula differ by ulps: measured <= 0.0015 of the tolerance.
            torch.testing.assert_close(score, old[name] * beta + criterion(w, g) * (1 - beta), rtol=1e-4, atol=1e-8)
    assert any(not torch.equal(runs["ce"][1][n], runs["sampled"][1][n]) for n in runs["ce"][1])


def test_score_steps_score_only_before_each_mask_update_and_on_every_step_that_only_scores():
    """`prune.score_steps: 2` with a mask every 4 steps: the scores take the CE gradient of steps 3-4 and 7-8
    (the mask is fixed from step 8), and of every step before the first mask, which under kd only score."""
    from compressor.pruner import Pruner
    from compressor.recipe import Recipe
    from compressor.train import Trainer, build_optimizer

    recipe = Recipe.model_validate({
        "prune": {"sparsity": 0.5, "prune_every": 4, "warmup": 0.0, "tau": 0.2, "final": 0.8, "score_steps": 2},
        "optim": {"lr": 1e-3}, "train": {"steps": 10, "batch_size": 2, "eval_every": 0, "loss": "kd"},
    })
    windows = torch.randint(97, (20, 16), generator=torch.Generator().manual_seed(0))
    model = build_model("llama", 97, init_range=0.2).train()
    pruner = Pruner(recipe.prune, 10).prepare(model)
    trainer = Trainer(model, pruner, build_optimizer(model, recipe, pruner, 0.0), windows, windows[:2], recipe,
                      10, torch.device("cpu"), teacher_copy(model))
    scored, apart = [], []
    for step in range(1, 11):
        old = {n: s.clone() for n, s in pruner.scores.items()}
        apart.append(trainer.scoring_plan(step) in (Scoring.SHARED_PASS, Scoring.OWN_PASS))
        trainer.train_step()
        if any(n not in old or not torch.equal(old[n], s) for n, s in pruner.scores.items()):
            scored.append(step)
    assert [u["step"] for u in trainer.log.mask_updates] == [4, 8]
    assert scored == [1, 2, 3, 4, 7, 8]
    assert [step for step, a in zip(range(1, 11), apart) if a] == [7, 8]  # the extra CE backward: 2 of 6 steps
