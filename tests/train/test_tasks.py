"""Loading a model for a task: what from_pretrained did not load is said in one line each, instead of
transformers' LOAD REPORT table."""

from __future__ import annotations

import logging

import torch
from safetensors.torch import load_file, save_file

from reshape.testing import tiny_model
from reshape.train.tasks import TASKS, load_task_model


def saved_base(tmp_path):
    folder = tmp_path / "base"
    tiny_model("bert").save_pretrained(folder)
    return folder


def test_a_new_task_head_is_said_in_one_line(tmp_path, caplog, capfd):
    folder = saved_base(tmp_path)
    with caplog.at_level(logging.WARNING):
        model = load_task_model(folder, TASKS["seq-cls"], ["neg", "pos"])
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"reshape: {folder} has no seq-cls head: a new one (classifier.bias, classifier.weight, "
                    "2 labels) starts from random weights"]
    assert "LOAD REPORT" not in capfd.readouterr().err and model.config.num_labels == 2


def test_missing_weights_of_the_model_itself_are_a_warning(tmp_path, caplog):
    folder = saved_base(tmp_path)
    state = load_file(folder / "model.safetensors")
    dropped = sorted(k for k in state if k.endswith("attention.self.query.weight"))[0]
    save_file({k: v for k, v in state.items() if k != dropped}, folder / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        model = load_task_model(folder, TASKS["seq-cls"], ["neg", "pos"])
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and said[1] == (f"reshape: {folder} lacks 1 weights of its model, which start from "
                                         f"random values: bert.{dropped}")
    assert isinstance(model.bert.encoder.layer[0].attention.self.query.weight, torch.nn.Parameter)
