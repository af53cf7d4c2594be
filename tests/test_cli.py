"""The `reshape` command end to end: real exit codes, real stdout and stderr, real files.

Every refusal must exit with code 2, print one `error: field=value: reason; fix` line per problem on
stderr (no traceback), and leave nothing behind: no OUT and no hidden `.OUT.reshape-*` sibling (temporary folder, lock).
The command runs in this process (helpers.cli_in_process: a subprocess pays 5-10 s of imports per run);
tests/test_cli_smoke.py runs each command once as a real process, the console script included.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import transformers as tf

from helpers.cli_in_process import invoke as run_cli
from helpers.cli_in_process import tiny_models
from helpers.cli_subprocess import assert_ok, assert_refused


# --- helpers -------------------------------------------------------------------------------------

def leftovers(parent: Path) -> list[str]:
    """Staging or backup folders that a run left next to its OUT."""
    return sorted(p.name for p in parent.iterdir() if ".reshape-" in p.name)


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was created: {sorted(p.name for p in out.iterdir())}"
    assert list(out.parent.iterdir()) == [], f"left in {out.parent}: {sorted(p.name for p in out.parent.iterdir())}"


def assert_model_folder(out: Path) -> dict:
    """A complete output folder; returns its reshape.json."""
    for name in ("config.json", "model.safetensors", "reshape.json", "README.md"):
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    assert leftovers(out.parent) == []
    assert [p.name for p in out.iterdir() if ".reshape-" in p.name] == []
    return json.loads((out / "reshape.json").read_text())


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny BERT (4 heads, width 64), GPT-2 (4 heads, width 64) and GQA Llama (4 heads, 2 KV heads)."""
    return tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def out(tmp_path) -> Path:
    """An OUT path inside a parent folder of its own, so leftovers there are easy to see."""
    parent = tmp_path / "outputs"
    parent.mkdir()
    return parent / "leaner"


# --- happy paths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, args, heads, keep, head_dim", [
    pytest.param("bert", ["--heads", 8, "--depth", 2], 8, [0, 3], 8, id="bert"),
    pytest.param("gpt2", ["--heads", 8, "--depth", 3, "--select", "uniform"], 8, [0, 2, 3], 8, id="gpt2"),
    pytest.param("llama", ["--heads", 8, "--keep", "0,2", "--keep-head-dim"], 8, [0, 2], 16, id="llama-keep-head-dim"),
])
def test_convert_json(models, out, name, args, heads, keep, head_dim):
    result = run_cli("convert", models[name], "--out", out, *args, "--json")
    assert_ok(result)
    recipe = json.loads(result.stdout)
    assert recipe["out"] == str(out)
    assert recipe["plan"]["keep"] == keep
    assert recipe["plan"]["heads"] == heads
    assert recipe["shape"]["head_dim"] == head_dim
    on_disk = assert_model_folder(out)
    assert on_disk == {k: v for k, v in recipe.items() if k != "out"}
    # The folder loads with plain transformers, with the planned shape.
    model = tf.AutoModel.from_pretrained(out)
    assert model.config.num_attention_heads == heads
    assert model.config.num_hidden_layers == len(keep)


def test_inspect_json(models):
    result = run_cli("inspect", models["llama"], "--heads", 8, "--depth", 2, "--json")
    assert_ok(result)
    report = json.loads(result.stdout)
    assert report["family"] == "llama"
    assert report["source"]["shape"] == {"layers": 4, "heads": 4, "kv_heads": 2, "head_dim": 16, "hidden": 64,
                                         "mlp": 96}
    # keep-width: the K/V projections keep their width, read as proportionally more KV heads.
    assert report["result"]["shape"] == {"layers": 2, "heads": 8, "kv_heads": 4, "head_dim": 8, "hidden": 64,
                                         "mlp": 96}
    assert report["result"]["params"]["total"] < report["source"]["params"]["total"]
    # A decoder's layers are picked by Block Influence when convert runs; inspect says so.
    assert report["plan"]["keep"] == "by importance"
    uniform = json.loads(run_cli("inspect", models["llama"], "--heads", 8, "--depth", 2, "--select", "uniform",
                                 "--json").stdout)
    assert uniform["plan"]["keep"] == [0, 3] and uniform["result"] == report["result"]


@pytest.mark.parametrize("args, heads, head_dim", [
    pytest.param(["--heads", 2, "--allow-fewer-heads"], 2, 32, id="fewer-heads-allowed"),
    pytest.param(["--heads", 16, "--force"], 16, 4, id="small-head-dim-forced"),
])
def test_convert_with_override_flag(models, out, args, heads, head_dim):
    result = run_cli("convert", models["bert"], "--out", out, *args, "--depth", 3, "--json")
    assert_ok(result)
    assert json.loads(result.stdout)["shape"]["head_dim"] == head_dim
    assert_model_folder(out)
    assert json.loads((out / "config.json").read_text())["num_attention_heads"] == heads


# --- refused plans -------------------------------------------------------------------------------

REFUSED_PLANS = [
    # BERT/GPT-2: 4 heads, width 64, 4 layers. Llama: 4 heads, 2 KV heads, head dim 16, 4 layers.
    pytest.param("bert", ["--heads", 2], "heads", 2,
                 ["fewer than the model's 4", "pass --allow-fewer-heads"], id="heads-fewer"),
    pytest.param("bert", ["--heads", 16], "heads", 16,
                 ["head dim 4", "below the minimum 8", "pass --force"], id="heads-head-dim-4"),
    pytest.param("bert", ["--depth", 5], "depth", 5,
                 ["between 1 and the model's 4 layers", "use a depth such as 3"], id="depth-too-deep"),
    pytest.param("bert", ["--keep", "0,4"], "keep", "0,4",
                 ["indices 4 outside 0..3", "use indices between 0 and 3"], id="keep-out-of-range"),
    pytest.param("bert", ["--keep", "0,1,1"], "keep", "0,1,1",
                 ["repeats 1", "list each kept layer once"], id="keep-duplicated"),
    pytest.param("bert", ["--keep", "0,1", "--depth", 3], "keep", "0,1",
                 ["lists 2 layers but depth is 3", "make --depth match"], id="keep-not-depth"),
    pytest.param("bert", ["--keep", "0,x"], "keep", "0,x",
                 ["not a comma-separated list of whole numbers", "--keep 0,2,4"], id="keep-not-numeric"),
    pytest.param("llama", ["--heads", 6], "heads", 6,
                 ["does not divide the attention width 64", "use one of 4, 8"], id="llama-gqa-heads"),
    pytest.param("llama", ["--heads", 5, "--keep-head-dim"], "heads", 5,
                 ["not a multiple of the 2 KV heads", "use one of 4, 6, 8, 10,"], id="llama-keep-head-dim-kv-groups"),
    pytest.param("bert", ["--heads", 8, "--keep-head-dim"], "head_mode", "keep-head-dim",
                 ["a bert config cannot express", "drop --keep-head-dim", "keep-width"], id="bert-keep-head-dim"),
    pytest.param("gpt2", ["--heads", 8, "--keep-head-dim"], "head_mode", "keep-head-dim",
                 ["a gpt2 config cannot express", "drop --keep-head-dim", "keep-width"], id="gpt2-keep-head-dim"),
]


@pytest.mark.parametrize("name, args, field, value, fragments", REFUSED_PLANS)
def test_refused_plan(models, out, name, args, field, value, fragments):
    result = run_cli("convert", models[name], "--out", out, *args)
    assert_refused(result, (field, value, fragments))
    assert_nothing_written(out)


def test_several_problems_reported_together(models, out):
    result = run_cli("convert", models["bert"], "--out", out, "--heads", 5, "--depth", 0)
    assert_refused(
        result,
        ("heads", 5, ["does not divide the attention width 64", "use one of 4, 8"]),
        ("depth", 0, ["between 1 and the model's 4 layers", "use a depth such as 3"]),
    )
    assert_nothing_written(out)


# --- refused sources -----------------------------------------------------------------------------

def _folder_without_config(models, tmp_path) -> str:
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "notes.txt").write_text("no config here\n")
    return str(folder)


def _copy_of_bert(models, tmp_path) -> Path:
    return Path(shutil.copytree(models["bert"], tmp_path / "bert-copy"))


def _without_weights(models, tmp_path) -> str:
    folder = _copy_of_bert(models, tmp_path)
    (folder / "model.safetensors").unlink()
    return str(folder)


def _corrupt_weights(models, tmp_path) -> str:
    folder = _copy_of_bert(models, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00garbage, not safetensors\xff" * 40)
    return str(folder)


def _remote_code(models, tmp_path) -> str:
    folder = _copy_of_bert(models, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("make_source, fragments", [
    pytest.param(lambda models, tmp_path: "bert-bse",
                 ["not a local folder, an alias or a reachable Hub repo", "did you mean bert-base",
                  "an alias: bert-base,"], id="alias-typo"),
    pytest.param(_folder_without_config, ["has no config.json", "save_pretrained"], id="no-config"),
    pytest.param(_without_weights, ["has no weight file", "model.safetensors", "save it with save_pretrained"],
                 id="no-weights"),
    pytest.param(_corrupt_weights, ["weights could not be read", "re-download or re-save the model"],
                 id="corrupt-weights"),
    pytest.param(_remote_code, ["needs remote code", "auto_map", "pass --trust-remote-code"], id="auto-map"),
])
def test_refused_source(models, tmp_path, out, make_source, fragments):
    source = make_source(models, tmp_path)
    result = run_cli("convert", source, "--out", out, "--heads", 8, "--depth", 2)
    assert_refused(result, ("model", source, fragments))
    assert_nothing_written(out)


# --- output folder -------------------------------------------------------------------------------

@pytest.fixture
def occupied_out(out) -> Path:
    out.mkdir()
    (out / "marker.txt").write_text("the user's own file\n")
    return out


def test_non_empty_out_refused(models, occupied_out):
    result = run_cli("convert", models["bert"], "--out", occupied_out, "--heads", 8, "--depth", 2)
    assert_refused(result, ("out", occupied_out, ["is not empty", "pass --overwrite"]))
    assert [p.name for p in occupied_out.iterdir()] == ["marker.txt"]
    assert (occupied_out / "marker.txt").read_text() == "the user's own file\n"
    assert sorted(p.name for p in occupied_out.parent.iterdir()) == [occupied_out.name]


def test_non_empty_out_replaced_with_overwrite(models, occupied_out):
    result = run_cli("convert", models["bert"], "--out", occupied_out, "--heads", 8, "--depth", 2, "--overwrite",
                     "--quiet")
    assert_ok(result)
    assert result.stdout.strip() == ""
    assert not (occupied_out / "marker.txt").exists()
    assert assert_model_folder(occupied_out)["plan"]["keep"] == [0, 3]
    assert sorted(p.name for p in occupied_out.parent.iterdir()) == [occupied_out.name]


def test_out_inside_the_source_folder_is_refused(models, tmp_path):
    source = Path(shutil.copytree(models["bert"], tmp_path / "bert-copy"))
    before = sorted(p.name for p in source.iterdir())
    result = run_cli("convert", source, "--out", source / "leaner", "--heads", 8, "--depth", 2)
    assert_refused(result, ("out", source / "leaner", ["is inside the source model's folder", "choose a folder outside"]))
    assert sorted(p.name for p in source.iterdir()) == before


def test_the_cli_reference_is_generated_from_the_cli_and_up_to_date():
    from reshape.cli import app

    root = Path(__file__).parent.parent
    done = subprocess.run([sys.executable, str(root / "scripts" / "cli_reference.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr  # stale: run python scripts/cli_reference.py
    reference = (root / "docs" / "reference" / "cli.md").read_text()
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"convert", "inspect", "distill", "finetune", "eval", "report", "sweep", "presets"} <= set(commands)
    assert [c for c in commands if f"## reshape {c}\n" not in reference] == []
    assert "docs/reference/cli.md" in (root / "README.md").read_text()
