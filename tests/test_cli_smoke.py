"""Each `reshape` command once as a real process: the entry point, the imports a command makes itself, real
exit codes and stdout apart from stderr. Everything else about the commands is tested in-process
(helpers.cli_in_process, which mirrors this environment: offline, COLUMNS=1000, NO_COLOR=1, warnings off).

Commands: convert (through the console script), inspect (and one refusal), presets, finetune and eval, distill,
push (a dry run: no Hub), report, sweep. Other tests that need a process for what they test stay where they
are: concurrent writers (tests/test_output.py), kill -9 and resume (tests/train/test_loop.py), accelerate
launch and FSDP (tests/train/), import-time checks (tests/test_imports.py), the examples.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers.cli_in_process import tiny_models, tiny_project
from helpers.cli_subprocess import assert_ok, assert_refused, run_cli

pytestmark = pytest.mark.integration  # `slow` marks those over ~5 s alone: each process imports torch


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny BERT (4 heads, width 64, 4 layers), GPT-2 and GQA Llama."""
    return tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT teacher (3 layers) with a tokenizer, its converted student (2 layers) and tiny data."""
    return tiny_project(tmp_path_factory.mktemp("tiny"))


@pytest.mark.slow
def test_convert_through_the_console_script_prints_the_table(models, tmp_path):
    script = shutil.which("reshape")
    if script is None:
        pytest.skip("the `reshape` console script is not on PATH")
    (tmp_path / "outputs").mkdir()
    out = tmp_path / "outputs" / "leaner"
    result = run_cli("convert", models["bert"], "-o", out, "--heads", 8, "--depth", 2, command=[script])
    assert_ok(result)
    assert "parameters" in result.stdout
    assert "Kept layers [0, 3]" in result.stdout
    assert f"Wrote {out}" in result.stdout
    for name in ("config.json", "model.safetensors", "reshape.json", "README.md"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.parent.iterdir()) == ["leaner"]  # no staging folder or lock left
    assert [p.name for p in out.iterdir() if ".reshape-" in p.name] == []


@pytest.mark.slow
def test_inspect_prints_the_table_and_refuses_on_stderr(models):
    result = run_cli("inspect", models["bert"], "--heads", 8, "--depth", 2)
    assert_ok(result)
    assert "parameters" in result.stdout
    assert "head dim" in result.stdout
    assert "Kept layers: [0, 3]" in result.stdout
    refused = run_cli("inspect", models["bert"], "--heads", 5, "--depth", 0)
    assert_refused(refused,
                   ("heads", 5, ["does not divide the attention width 64", "use one of 4, 8"]),
                   ("depth", 0, ["between 1 and the model's 4 layers", "use a depth such as 3"]))
    assert refused.stdout == ""


def test_presets_lists_every_preset_file():
    done = run_cli("presets", "--json")
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    files = sorted(p.stem for p in (Path(__file__).parent.parent / "presets").glob("*.yaml"))
    assert sorted(listed) == files and listed["minilm"]["heads"] == 24


@pytest.mark.slow
def test_finetune_then_eval(tiny, tmp_path):
    out = tmp_path / "ft"
    done = run_cli("finetune", tiny["student"], "--task", "seq-cls", "--data", tiny["reviews.csv"],
                   "--label-column", "positive", "-o", out, "--steps", 2, "--batch-size", 16, "--json")
    assert_ok(done)
    assert json.loads(done.stdout)["steps"] == 2
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    scored = run_cli("eval", out, "--task", "seq-cls", "--data", tiny["reviews.csv"], "--label-column", "positive",
                     "--json")
    assert_ok(scored)
    assert json.loads(scored.stdout)["split"] == "test"


@pytest.mark.slow
def test_distill(tiny, tmp_path):
    out = tmp_path / "distilled"
    done = run_cli("distill", "--teacher", tiny["teacher"], "--student", tiny["student"], "--data", tiny["text.txt"],
                   "-o", out, "--steps", 1, "--batch-size", 8, "--quiet")
    assert_ok(done)
    assert done.stdout == ""
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_push_dry_run(tiny):
    before = {p: p.stat().st_mtime_ns for p in tiny["student"].rglob("*")}
    done = run_cli("push", tiny["student"], "--repo", "alice/tiny-leaner", "--dry-run", "--json")
    assert_ok(done)
    result = json.loads(done.stdout)
    assert result["dry_run"] and result["commit"] is None
    assert "model.safetensors" in [f["path"] for f in result["files"]]
    assert {p: p.stat().st_mtime_ns for p in tiny["student"].rglob("*")} == before


@pytest.mark.slow
def test_report(tiny):
    done = run_cli("report", tiny["teacher"], tiny["student"], "--batch-sizes", "1", "--seq-len", "8", "--repeats",
                   "1", "--no-kappa", "--json")
    assert_ok(done)
    assert json.loads(done.stdout)["ratios"]["flops_per_sample"] < 1


@pytest.mark.slow
def test_sweep(tiny, tmp_path):
    done = run_cli("sweep", tiny["teacher"], "--heads", "4", "--depth", "1", "--data", tiny["labelled.csv"], "--task",
                   "seq-cls", "--budget", "1", "--batch-size", "8", "-o", tmp_path / "s", "--json")
    assert_ok(done)
    assert [r["point"] for r in json.loads(done.stdout)["rows"]] == ["source", "1x2", "1x4"]
