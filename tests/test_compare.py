"""`tapc compare` through CliRunner, on two short runs of a tiny model."""

from __future__ import annotations

import json

import pytest

from .conftest import run_cli as run


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, gpt2_dir, data_dir):
    """Two finished runs: 30% and 50% sparsity, the second evaluated on fewer tokens."""
    root = tmp_path_factory.mktemp("runs")
    recipe = root / "tiny.yaml"
    recipe.write_text(
        "name: tiny\nprune: {prune_every: 2, warmup: 0.1, tau: 0.2, final: 0.6}\noptim: {lr: 1.0e-3}\n"
        "train: {steps: 4, batch_size: 2, eval_every: 0}\ndata: {seq_len: 32}\neval: {max_tokens: 600}\n"
    )
    runs = []
    for name, sparsity, tokens in (("s30", 0.3, 600), ("s50", 0.5, 300)):
        out = root / name
        result = run("compress", gpt2_dir, "--recipe", recipe, "--dataset", data_dir, "--out", out,
                     "--sparsity", sparsity, "--eval-tokens", tokens, "--json")
        assert result.exit_code == 0, result.output
        runs.append((out, json.loads(result.stdout)))
    return runs


def test_compare_table(two_runs):
    (a, ra), (b, rb) = two_runs
    result = run("compare", a, b)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["run", "model", "sparsity", "pattern", "dense", "PPL", "pruned", "PPL", "change",
                                "KL", "to", "dense", "top-1", "agree", "loss", "steps", "time"]
    assert len(lines) == 3
    for line, path, report in ((lines[1], a, ra), (lines[2], b, rb)):
        assert line.startswith(str(path))
        assert f"{report['perplexity']['pruned']['ppl']:.3f}" in line
        pruned = report["perplexity"]["pruned"]
        assert f"{pruned['kl']:.4f}" in line and f"{pruned['agreement']:.1%}" in line
        assert f"{report['sparsity']['prunable_sparsity']:.2%}" in line and "unstructured" in line
    # Different token counts: said on stderr, so the table is not read as a ranking it cannot support.
    assert "different windows or token counts" in result.stderr


def test_compare_json(two_runs):
    (a, ra), (b, _) = two_runs
    result = run("compare", a, b / "report.json", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [r["run"] for r in doc["runs"]] == [str(a), str(b)]
    first = doc["runs"][0]
    assert first["pruned_ppl"] == ra["perplexity"]["pruned"]["ppl"]
    assert first["dense_ppl"] == ra["perplexity"]["dense"]["ppl"]
    assert first["sparsity"] == ra["sparsity"]["prunable_sparsity"] and first["target"] == 0.3
    assert first["steps"] == 4 and first["seconds"] == ra["seconds"] and first["pattern"] == "unstructured"
    assert doc["comparable"] is False and doc["note"]
    same = json.loads(run("compare", a, a, "--json").stdout)
    assert same["comparable"] is True and same["note"] is None


def test_compare_markdown(two_runs):
    (a, _), (b, _) = two_runs
    result = run("compare", a, b, "--markdown")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| run | model | sparsity |") and lines[1].startswith("| --- |")
    assert len(lines) == 4 and all(line.count("|") == lines[0].count("|") for line in lines)


def test_compare_bad_input(two_runs, tmp_path):
    (a, _), _ = two_runs
    result = run("compare", a, tmp_path / "missing")
    assert result.exit_code == 2 and "holds no report.json" in result.stderr
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "report.json").write_text('{"something": "else"}')
    result = run("compare", tmp_path / "other")
    assert result.exit_code == 2 and "not a tapc compress report" in result.stderr
    assert run("compare").exit_code == 2
    assert run("compare", a, "--json", "--markdown").exit_code == 2
