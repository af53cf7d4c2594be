"""A sharded safetensors source of a tiny model (a timm one in one file, as timm saves it), a conversion
forced in memory or forced to stream, and the comparison of two output folders tensor for tensor. Shared
by tests/test_streaming.py and tests/test_calibration_stream.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import reshape
import reshape.pipeline
from reshape.testing import tiny_config, tiny_model

SHARD = "40KB"  # the tiny models are 0.1-0.7 MB: 3 shards or more each


def source(tmp_path: Path, model_type: str, head=None, dtype=torch.float32, shard=SHARD) -> Path:
    if head is None:
        model = tiny_model(model_type)
    else:
        torch.manual_seed(0)
        model = head(tiny_config(model_type))
    folder = tmp_path / f"{model_type}-source"
    model.to(dtype).save_pretrained(folder, max_shard_size=shard)
    return folder


def timm_source(tmp_path: Path, architecture: str, **args) -> Path:
    """A tiny random-weight timm model saved as timm saves it (save_for_hf: config.json and one
    model.safetensors; timm loads no shards)."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    folder = tmp_path / f"{architecture}-source"
    save_for_hf(timm.create_model(architecture, pretrained=False, **args), folder, safe_serialization=True)
    return folder


def in_memory(monkeypatch, *args, **kwargs) -> dict:
    with monkeypatch.context() as m:
        m.setattr(reshape.pipeline, "streaming_conversion", lambda *a, **k: None)
        return reshape.pipeline.convert(*args, **kwargs)


def streamed(monkeypatch, *args, **kwargs) -> dict:
    with monkeypatch.context() as m:  # a streamed run never loads the model
        m.setattr(reshape.pipeline, "load_model", lambda *a: pytest.fail("loaded the whole model"))
        return reshape.pipeline.convert(*args, **kwargs)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({key: f.get_tensor(key) for key in f.keys()})
    return out


def assert_same_folder(a: Path, b: Path) -> None:
    x, y = tensors(a), tensors(b)
    assert x.keys() == y.keys()
    for key in x:
        assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key
    for name in ("config.json", "generation_config.json"):
        assert (a / name).is_file() == (b / name).is_file(), name
        if (a / name).is_file():
            assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name
    recipe = [json.loads((f / "reshape.json").read_text()) for f in (a, b)]
    assert recipe[0] == recipe[1]
