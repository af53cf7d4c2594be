"""`reshape sweep` on a tiny grid: every point and control recorded, resumable, results and plot written."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from helpers.cli_in_process import invoke

from reshape.errors import ReshapeError
from reshape.sweep import Point, grid, markdown, sweep

WORDS = ["good", "great", "bad", "awful"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "the", "film", "was"]
    tf.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(root / "model")
    torch.manual_seed(0)
    tf.BertModel(tf.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=16)).save_pretrained(root / "model")
    g = torch.Generator().manual_seed(0)
    words = [WORDS[int(i)] for i in torch.randint(0, 4, (40,), generator=g)]
    (root / "reviews.csv").write_text("text,label\n" + "".join(f"the film was {w},{int(w in WORDS[:2])}\n"
                                                                for w in words))
    return root


def test_grid_has_the_source_and_a_same_heads_control_per_depth():
    assert grid(2, [4, 8], [1, 2]) == [Point(None, None), Point(2, 2), Point(4, 2), Point(8, 2),
                                       Point(2, 1), Point(4, 1), Point(8, 1)]


def test_the_table_pairs_each_point_with_the_source_on_the_same_seed():
    def row(point, scores):
        return {"point": point, "heads": 2, "depth": 3, "control": False, "params": 10, "non_embedding": 5,
                "seeds": len(scores), "validation_mean": 0.8, "mean": sum(scores) / len(scores), "std": 0.0,
                "scores": scores}

    text = markdown({"rows": [row("source", [0.80, 0.70]), row("4x1", [0.81, 0.74]), row("8x1", [0.5])],
                     "breaks_below": 0.98, "bar": 0.784, "breaks_at": None})
    # +0.01 and +0.04: mean +0.025, sample std 0.0212; a point with one seed has no spread to give
    assert text.splitlines()[-1] == "- 4x1 - source, paired by seed (test): +0.0250 ± 0.0212 (+0.0100, +0.0400)"
    assert "8x1 - source" not in text


def test_sweep_runs_every_point_and_resumes_without_redoing_them(setup, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    args = dict(heads=[4], depths=[2], data=str(setup / "reviews.csv"), task="seq-cls", budget=1, seeds=2,
                distill_data=str(setup / "reviews.csv"), batch_size=8)
    results = sweep(str(setup / "model"), out, **args)
    assert [(r["point"], r["depth"], r["heads"], r["seeds"], r["control"]) for r in results["rows"]] == [
        ("source", 3, 2, 2, False), ("2x2", 2, 2, 2, True), ("2x4", 2, 4, 2, False)]
    assert sorted(p.name for p in out.iterdir()) == ["pareto.png", "points", "results.json", "results.md",
                                                     "settings.json"]
    assert (out / "pareto.png").stat().st_size > 0 and "(control: same heads)" in (out / "results.md").read_text()
    params = {r["point"]: r["params"] for r in results["rows"]}
    assert params["source"] > params["2x2"] == params["2x4"]  # keep-width: heads cost no parameters

    import reshape.train.finetune as finetune_module

    def no_training(*a, **k):
        raise AssertionError("a finished point was trained again")

    monkeypatch.setattr(finetune_module, "finetune", no_training)
    (out / "points" / "2x4" / "seed1.json").unlink()  # as if interrupted during the last point
    with pytest.raises(AssertionError, match="trained again"):
        sweep(str(setup / "model"), out, **args)  # only the missing point runs
    monkeypatch.undo()
    again = sweep(str(setup / "model"), out, **args)
    assert [r["seeds"] for r in again["rows"]] == [2, 2, 2]


def test_sweep_refuses_bad_plans_and_other_settings_before_training(setup, tmp_path):
    with pytest.raises(ReshapeError, match="heads=3: does not divide the attention width 32"):
        sweep(str(setup / "model"), tmp_path / "a", heads=[3], depths=[2], data=str(setup / "reviews.csv"),
              task="seq-cls", budget=1)
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "settings.json").write_text(json.dumps({"budget": 99}))
    with pytest.raises(ReshapeError, match="holds a sweep with other settings"):
        sweep(str(setup / "model"), tmp_path / "b", heads=[4], depths=[2], data=str(setup / "reviews.csv"),
              task="seq-cls", budget=1)


def test_cli_sweep(setup, tmp_path):  # in this process; tests/test_cli_smoke.py runs `reshape sweep` as one
    done = invoke("sweep", setup / "model", "--heads", "4", "--depth", "1", "--data", setup / "reviews.csv", "--task",
                  "seq-cls", "--budget", "1", "--batch-size", "8", "-o", tmp_path / "s", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["point"] for r in json.loads(done.stdout)["rows"]] == ["source", "1x2", "1x4"]
