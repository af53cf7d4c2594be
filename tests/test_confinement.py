"""reshape reads only inside a model folder, and never unpickles weights (reshape/confine.py).

`reshape.load`, convert, training and push read files named relative to the folder: a reshape.json or
weight index that points out (`..`, an absolute path) or a file linked out is refused, as is a folder
whose only weights are a pickle (the refusal says how to convert it; torch.load is never called). A
corrupt safetensors file is a one-line error, and a crafted Hub id never reaches a model card.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from helpers.cases import bert_config, timm_vit
from helpers.cli_in_process import invoke

import reshape
from reshape.card import build_card
from reshape.errors import ReshapeError
from reshape.source import load_timm_folder
from reshape.train.tasks import TASKS, load_task_model


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and "Traceback" not in text
    return text


@pytest.fixture
def bert(tmp_path) -> Path:
    """A transformers folder (masked LM: its decoder is tied to the embeddings)."""
    torch.manual_seed(0)
    folder = tmp_path / "bert"
    tf.BertForMaskedLM(bert_config()).eval().save_pretrained(folder)
    return folder


@pytest.fixture
def gpt(tmp_path) -> Path:
    """An fx-path output folder: model.safetensors, code.py and reshape.json."""
    folder = tmp_path / "gpt"
    reshape.convert("helpers.fx_models:gpt", folder, heads=4, depth=3, trust_remote_code=True)
    return folder


@pytest.fixture
def timm_folder(tmp_path) -> Path:
    from timm.models import save_for_hf

    folder = tmp_path / "vit"
    save_for_hf(timm_vit(), folder, safe_serialization=True)
    return folder


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any torch.load fails the test: reshape must refuse a pickle before a loader reaches for it."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"torch.load was called on {args[:1]}")
    monkeypatch.setattr(torch, "load", refuse)


def outside(tmp_path: Path, data: bytes | None = None, source: Path | None = None) -> Path:
    """A file outside every model folder: `data`, or a move of `source`."""
    (tmp_path / "elsewhere").mkdir(exist_ok=True)
    path = tmp_path / "elsewhere" / "model.safetensors"
    if source is not None:
        shutil.move(source, path)
    else:
        path.write_bytes(data)
    return path


def to_pickle(folder: Path) -> Path:
    """Replace the folder's model.safetensors by a pytorch_model.bin of the same tensors."""
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder / "pytorch_model.bin"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-64])


# --- paths that leave the folder -------------------------------------------------------------------

def test_fx_load_refuses_a_build_folder_outside_out(gpt, tmp_path):
    """The probe that failed: a reshape.json whose build folder climbs out made reshape.load read a
    safetensors file outside OUT, and a garbage one surfaced as a raw SafetensorError."""
    outside(tmp_path, b"not safetensors")
    recipe = json.loads((gpt / "reshape.json").read_text())
    recipe["build"] = {"timm": "test_vit_relpos", "model_args": {}, "folder": "../../../" + str(tmp_path / "elsewhere")}
    (gpt / "reshape.json").write_text(json.dumps(recipe))
    with pytest.raises(ReshapeError) as e:
        reshape.load(gpt, trust_remote_code=True)
    assert one_line(e).startswith("reshape.json build.folder=../../../")
    assert "remove build.folder from reshape.json" in str(e.value)


def test_fx_load_refuses_weights_linked_out(gpt, tmp_path):
    target = outside(tmp_path, source=gpt / "model.safetensors")
    os.symlink(target, gpt / "model.safetensors")
    with pytest.raises(ReshapeError) as e:
        reshape.load(gpt, trust_remote_code=True)
    assert one_line(e) == (f"out=model.safetensors: is a link to {target.resolve()}, outside {gpt}; reshape reads "
                           "only files inside it; copy the file into the folder instead of linking it")


def test_fx_load_of_a_corrupt_safetensors_is_one_line(gpt):
    truncate(gpt / "model.safetensors")
    with pytest.raises(ReshapeError) as e:
        reshape.load(gpt, trust_remote_code=True)
    assert re.fullmatch(rf"out={re.escape(str(gpt))}: weights could not be read \(model.safetensors is not a valid "
                        r"safetensors file: SafetensorError: .*\); re-download or re-save the model", one_line(e))


@pytest.mark.parametrize("shard", ["../elsewhere/model.safetensors", "ABSOLUTE"])
def test_load_refuses_a_weight_index_that_leaves_the_folder(bert, tmp_path, shard):
    target = outside(tmp_path, source=bert / "model.safetensors")
    shard = str(target) if shard == "ABSOLUTE" else shard
    keys = load_file(target).keys()
    (bert / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {k: shard for k in keys}}))
    with pytest.raises(ReshapeError) as e:
        reshape.load(bert)
    reason = "is an absolute path" if shard == str(target) else "climbs out of"
    assert one_line(e).startswith(f"model model.safetensors.index.json weight_map={shard}: {reason}")


def test_load_refuses_weights_linked_out(bert, tmp_path):
    target = outside(tmp_path, source=bert / "model.safetensors")
    os.symlink(target, bert / "model.safetensors")
    with pytest.raises(ReshapeError) as e:
        reshape.load(bert)
    assert one_line(e).startswith(f"model=model.safetensors: is a link to {target.resolve()}, outside {bert}")


def test_a_hub_snapshot_may_link_into_its_own_blobs(bert, tmp_path):
    """huggingface_hub stores a download as links from snapshots/REV into the repo's blobs: allowed."""
    repo = tmp_path / "hub" / "models--alice--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, path in enumerate(sorted(bert.iterdir())):
        shutil.copy(path, blobs / f"blob{i}")
        os.symlink(Path("..", "..", "blobs", f"blob{i}"), snapshot / path.name)
    loaded = reshape.load(snapshot)
    assert torch.equal(loaded.bert.embeddings.word_embeddings.weight, load_file(bert / "model.safetensors")[
        "bert.embeddings.word_embeddings.weight"])


def test_an_adapter_folder_is_refused(bert):
    """transformers would load the base model wherever adapter_config.json points."""
    (bert / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "../x"}))
    with pytest.raises(ReshapeError) as e:
        reshape.load(bert)
    assert "is a PEFT adapter folder" in one_line(e)


# --- no pickles ------------------------------------------------------------------------------------

def test_a_pickle_is_refused_with_a_conversion_that_works(bert, no_unpickling, monkeypatch):
    expected = load_file(bert / "model.safetensors")
    pickle = to_pickle(bert)
    with pytest.raises(ReshapeError) as e:
        reshape.load(bert)
    text = one_line(e)
    assert text.startswith(f"model={bert}: holds its weights only as a pickle (pytorch_model.bin), which reshape "
                           "never loads (unpickling can run code); if you trust the file, convert it once: python -c")
    assert "weights_only=True" in text and "weights_only=False" not in text
    monkeypatch.undo()  # the fix itself unpickles, in its own process, once the user chose to trust the file
    command = text.split("convert it once: python -c ", 1)[1]
    subprocess.run([sys.executable, "-c", command.strip('"')], check=True, timeout=120)
    assert pickle.exists() and (bert / "model.safetensors").is_file()
    loaded = reshape.load(bert).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_convert_refuses_a_pickle_through_the_cli(bert, tmp_path, no_unpickling):
    """The CLI prints the same refusal on one line and exits 2, with nothing written (and nothing unpickled)."""
    to_pickle(bert)
    result = invoke("convert", bert, "-o", tmp_path / "out", "--heads", "8", "--depth", "2")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "holds its weights only as a pickle (pytorch_model.bin)" in errors[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_training_refuses_a_pickle(bert, no_unpickling):
    to_pickle(bert)
    with pytest.raises(ReshapeError) as e:
        load_task_model(bert, TASKS["masked-lm"])
    assert "holds its weights only as a pickle (pytorch_model.bin)" in one_line(e)


def test_timm_refuses_a_pickle(timm_folder, no_unpickling):
    to_pickle(timm_folder)
    with pytest.raises(ReshapeError) as e:
        load_timm_folder(timm_folder)
    assert one_line(e).startswith(f"model={timm_folder}: holds its weights only as a pickle (pytorch_model.bin)")


def test_push_refuses_a_pickle(bert, no_unpickling):
    to_pickle(bert)
    with pytest.raises(ReshapeError) as e:
        reshape.push(bert, "alice/tiny", dry_run=True)
    assert one_line(e).startswith(f"folder={bert}: holds its weights only as a pickle (pytorch_model.bin)")


# --- corrupt safetensors ---------------------------------------------------------------------------

def test_training_on_a_corrupt_safetensors_is_one_line(bert):
    truncate(bert / "model.safetensors")
    with pytest.raises(ReshapeError) as e:
        load_task_model(bert, TASKS["masked-lm"])
    assert "weights could not be read (model.safetensors is not a valid safetensors file: SafetensorError" \
        in one_line(e)


def test_timm_on_a_corrupt_safetensors_is_one_line(timm_folder):
    (timm_folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(ReshapeError) as e:
        load_timm_folder(timm_folder)
    assert "weights could not be read (model.safetensors is not a valid safetensors file: SafetensorError" \
        in one_line(e)


# --- Hub ids in model cards ------------------------------------------------------------------------

def test_a_crafted_hub_id_never_reaches_the_card(bert, tmp_path, caplog):
    out = tmp_path / "out"
    reshape.convert(str(bert), out, heads=8, depth=2)
    recipe = json.loads((out / "reshape.json").read_text())
    (out / "reshape.json").write_text(json.dumps({**recipe, "hub_id": "../../etc"}))
    card = build_card(out)
    assert card.data.base_model is None and "../../etc" not in str(card)
    assert "'../../etc' is not a Hub repo id" in caplog.text


def test_a_source_card_s_crafted_base_model_is_left_out(bert, tmp_path):
    (bert / "README.md").write_text("---\nbase_model:\n- ../../etc\n- google-bert/bert-base-uncased\nlicense: mit\n"
                                    "---\n# tiny\n")
    out = tmp_path / "out"
    reshape.convert(str(bert), out, heads=8, depth=2)
    card = (out / "README.md").read_text()
    assert "../../etc" not in card and "google-bert/bert-base-uncased" in card and "license: mit" in card
