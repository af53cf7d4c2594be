"""Output folders are all-or-nothing and never damage what the user had."""

import json
import pytest
import transformers as tf

import reshape
from reshape.errors import ReshapeError
from reshape.families.hf import BERT


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
