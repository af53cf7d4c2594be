"""Output folders are all-or-nothing and never damage what the user had."""

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest
import transformers as tf

import reshape
import reshape.output
import reshape.pipeline
from reshape.errors import ReshapeError
from reshape.families.hf import BERT
from reshape.output import locked, staged

CLI_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "1000", "NO_COLOR": "1",
           "PYTHONWARNINGS": "ignore"}


@pytest.fixture
def source(tmp_path):
    folder = tmp_path / "models" / "bert"
    tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               vocab_size=50)).save_pretrained(folder)
    return folder


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_out_containing_the_source_is_refused_even_with_overwrite(source):
    before = names(source)
    with pytest.raises(ReshapeError, match="out=.*models: contains the source model; choose a folder that does not"):
        reshape.convert(str(source), source.parent, heads=4, overwrite=True)
    assert names(source) == before


def test_output_and_plan_problems_are_reported_together(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ReshapeError) as e:
        reshape.convert(str(source), out, heads=3, depth=0)
    assert [p.field for p in e.value.problems] == ["out", "heads", "depth"]
    assert names(out) == ["keep.txt"]


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_save_leaves_no_partial_folder(source, tmp_path, monkeypatch, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("mine")

    def broken_save(model, spec, folder):
        (folder / "config.json").write_text("{}")  # half-written, then the disk "fails"
        raise OSError("disk full")

    monkeypatch.setattr(BERT, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        reshape.convert(str(source), out, heads=4, overwrite=True)
    assert names(tmp_path) == ["models"] + (["out"] if existing else [])
    if existing:
        assert names(out) == ["keep.txt"]


def test_a_path_source_is_recorded_as_text(source, tmp_path):
    recipe = reshape.convert(source, tmp_path / "out", heads=4, depth=1)  # a Path, not a str
    assert json.loads((tmp_path / "out" / "reshape.json").read_text())["source"] == str(source) == recipe["source"]


# --- one writer at a time, and what a killed run left --------------------------------------------

def test_a_second_writer_is_refused_at_once_naming_the_holder(source, tmp_path):
    out = tmp_path / "out"
    with locked(out):  # another reshape run, in the middle of writing OUT
        with pytest.raises(ReshapeError) as e:
            reshape.convert(str(source), out, heads=4)
        holder = (tmp_path / ".out.reshape-holder").read_text()
    assert len(e.value.problems) == 1 and "\n" not in str(e.value)
    assert str(e.value).startswith(f"out={out}: is being written by another reshape process (pid {os.getpid()} on ")
    assert " ".join(holder.split()) in str(e.value)
    assert str(e.value).endswith("; wait for it to finish, or choose another folder")
    assert names(tmp_path) == ["models"]  # the holder wrote nothing; its lock and holder files are gone


@pytest.mark.parametrize("command", ["finetune", "distill", "sweep"])
def test_commands_that_write_in_place_hold_the_lock_for_the_whole_run(tmp_path, command):
    from reshape.sweep import sweep
    from reshape.train.distill import distill
    from reshape.train.finetune import finetune

    out = tmp_path / "out"
    run = {"finetune": lambda: finetune("no-model", out, task="seq-cls", data="no-data"),
           "distill": lambda: distill("no-teacher", "no-student", out, data="no-data"),
           "sweep": lambda: sweep("no-model", out, heads=[4], depths=[1], data="no-data", task="seq-cls", budget=1)}
    with locked(out):
        with pytest.raises(ReshapeError, match="is being written by another reshape process"):
            run[command]()  # refused before it looks at its (missing) model or data


@pytest.mark.integration
@pytest.mark.slow
def test_two_converts_at_once_give_one_folder_and_one_clear_refusal(source, tmp_path):
    """Two real `reshape convert` processes to one new OUT. Each waits in its save until the test says go,
    so the second always arrives while the first holds OUT: before the lock, both wrote and both said
    "Wrote OUT", the second replacing the first."""
    out, go = tmp_path / "out", tmp_path / "go"
    gate = ("import sys, time; from pathlib import Path; from reshape.families.hf import BERT; save = BERT.save\n"
            "def waiting(*args):\n"
            f"    end = time.time() + 120\n"
            f"    while not Path({str(go)!r}).exists() and time.time() < end: time.sleep(0.05)\n"
            "    save(*args)\n"
            "BERT.save = waiting; sys.argv[0] = 'reshape'\n"
            "from reshape.cli import main; main()")
    command = [sys.executable, "-c", gate, "convert", str(source), "--heads", "4", "--depth", "1", "-o", str(out)]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CLI_ENV)
            for _ in range(2)]
    deadline = time.time() + 120
    while all(r.poll() is None for r in runs) and time.time() < deadline:
        time.sleep(0.1)
    refused = next((r for r in runs if r.poll() is not None), None)
    go.touch()
    results = {r.pid: (r.wait(timeout=120), *r.communicate()) for r in runs}
    assert refused is not None, f"neither run was refused while the other held OUT: {results}"
    writer = next(r for r in runs if r is not refused)
    code, stdout, stderr = results[refused.pid]
    assert code == 2 and "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"error: out={out}: is being written by another reshape process (pid {writer.pid} "), lines
    assert "reshape convert" in lines[0] and lines[0].endswith("; wait for it to finish, or choose another folder")
    code, stdout, stderr = results[writer.pid]
    assert code == 0, stderr
    assert isinstance(tf.AutoModel.from_pretrained(out), tf.BertModel)
    assert json.loads((out / "reshape.json").read_text())["plan"]["heads"] == 4
    assert names(tmp_path) == ["go", "models", "out"]  # no lock, holder or temporary folder left beside OUT


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_appears_during_the_run_is_replaced_only_with_overwrite(source, tmp_path, monkeypatch,
                                                                              overwrite):
    out = tmp_path / "out"
    save = BERT.save

    def another_program_writes_out(model, spec, folder):
        out.mkdir()
        (out / "theirs.txt").write_text("not reshape's")
        save(model, spec, folder)

    monkeypatch.setattr(BERT, "save", another_program_writes_out)
    if overwrite:
        reshape.convert(str(source), out, heads=4, overwrite=True)
        assert "theirs.txt" not in names(out) and "reshape.json" in names(out)
    else:
        with pytest.raises(ReshapeError, match=f"^out={out}: was created by another program while reshape was "
                                               "writing, so nothing was replaced; pass --overwrite"):
            reshape.convert(str(source), out, heads=4)
        assert names(out) == ["theirs.txt"]
    assert names(tmp_path) == ["models", "out"]


def test_temporary_folders_of_a_killed_run_are_removed_and_reported(source, tmp_path, caplog):
    out = tmp_path / "out"
    stale = [".out.reshape-tmp", ".out.reshape-old", ".out.reshape-tmp-1a2b3c4d"]  # the last: reshape 0.1.0's name
    for name in stale:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / ".other.reshape-tmp").mkdir()  # another OUT's: not ours to remove
    with caplog.at_level(logging.WARNING, logger="reshape"):
        reshape.convert(str(source), out, heads=4)
    assert names(tmp_path) == [".other.reshape-tmp", "models", "out"]
    removed = [r.getMessage() for r in caplog.records if "left by an interrupted run" in r.getMessage()]
    assert removed == [f"reshape: removed {tmp_path / name}, left by an interrupted run on {out}"
                       for name in sorted(stale)]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_output_files_have_the_modes_the_umask_gives(source, tmp_path, umask):
    out = tmp_path / "out"
    before = os.umask(umask)
    try:
        reshape.convert(str(source), out, heads=4)
    finally:
        os.umask(before)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes["model.safetensors"] == 0o666 & ~umask  # safetensors alone writes 0600
    assert modes == {name: (0o777 if name == "out" else 0o666) & ~umask for name in modes}


# --- output paths that cannot work, refused before any work --------------------------------------

def test_a_parent_that_is_a_file_is_refused_before_any_work(source, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("a file")
    monkeypatch.setattr(reshape.pipeline, "load_model", lambda *a: pytest.fail("loaded the model"))
    for out in (tmp_path / "afile" / "sub", tmp_path / "afile" / "deeper" / "sub"):
        with pytest.raises(ReshapeError) as e:
            reshape.convert(str(source), out, heads=4)
        assert str(e.value) == (f"out={out}: has a parent that is a file ({tmp_path / 'afile'}); "
                                "choose a path whose parent folders are folders")
    assert names(tmp_path) == ["afile", "models"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_virtual_filesystem_is_refused_before_any_work(source, monkeypatch):
    monkeypatch.setattr(reshape.pipeline, "load_model", lambda *a: pytest.fail("loaded the model"))
    with pytest.raises(ReshapeError) as e:
        reshape.convert(str(source), "/proc/reshape-out", heads=4)
    assert len(e.value.problems) == 1
    assert str(e.value).startswith("out=/proc/reshape-out: cannot be written: /proc refuses new folders (")
    assert str(e.value).endswith("; choose a folder on a writable disk")


def test_too_little_free_disk_is_refused_before_anything_is_written(source, tmp_path, monkeypatch):
    monkeypatch.setattr(reshape.output.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    with pytest.raises(ReshapeError, match=r"out=.*out: is on a disk with 0.00 GB free but the model needs 0.00 GB; "
                                           "free some space"):
        reshape.convert(str(source), tmp_path / "out", heads=4)
    assert names(tmp_path) == ["models"]


def test_staging_without_the_lock_is_a_bug(tmp_path):
    with pytest.raises(RuntimeError, match="needs OUT's lock"):
        with staged(tmp_path / "out"):
            pass
