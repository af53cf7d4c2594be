"""Converting from config.json alone (reshape/config_convert.py): for the LLaMA-style models it describes,
the folder equals the in-memory path's, tensor for tensor, with the same shards, index, config, recipe and
card; the CLI then imports none of transformers; anything else (or any doubt) goes to the general path
with nothing written."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from helpers.streaming import assert_same_folder, in_memory, source, streamed, tensors

import reshape
from reshape.config_convert import convert_from_config
from reshape.errors import ReshapeError
from reshape.streaming import SAVE_PRETRAINED_SHARD
from reshape.testing import tiny_config

# (model type, class, dtype, config overrides, convert options): the tensor layouts config_shape describes
# (GQA, explicit head dim, Q/K/V/O and MLP biases, tied output layer, the base model) under each transfer
# that needs no activations (contiguous keep-width, keep-head-dim, --mlp, --keep/--select).
CASES = {
    "llama-gqa-mlp": ("llama", tf.LlamaForCausalLM, torch.bfloat16, {}, dict(heads=8, depth=4, mlp=64, select="uniform")),
    "llama-keep-head-dim": ("llama", tf.LlamaForCausalLM, torch.bfloat16, {},
                            dict(heads=8, keep=[0, 3, 5], keep_head_dim=True)),
    "llama-biases-tied": ("llama", tf.LlamaForCausalLM, torch.float32,
                          dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
                          dict(heads=8, depth=3, select="last")),
    "llama-head-dim-base": ("llama", tf.LlamaModel, torch.float16, dict(head_dim=16),
                            dict(heads=8, depth=4, select="first")),
    "qwen2": ("qwen2", tf.Qwen2ForCausalLM, torch.bfloat16, {}, dict(heads=8, depth=4, mlp=48, select="uniform")),
    "mistral-keep-head-dim": ("mistral", tf.MistralForCausalLM, torch.float32, {},
                              dict(heads=8, keep=[1, 2, 4], keep_head_dim=True)),
}


def sharded(tmp_path: Path, model_type: str, head, dtype, overrides: dict) -> Path:
    torch.manual_seed(0)
    folder = tmp_path / f"{model_type}-source"
    head(tiny_config(model_type, **overrides)).to(dtype).save_pretrained(folder, max_shard_size="40KB")
    return folder


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_folder_equals_the_general_path_s(case, tmp_path, monkeypatch):
    """The tensors of the in-memory path; the files (shards of the source's size, index, config, card) of
    the general streaming path."""
    model_type, head, dtype, overrides, options = CASES[case]
    src = sharded(tmp_path, model_type, head, dtype, overrides)
    assert len(list(src.glob("*.safetensors"))) >= 3
    recipe = convert_from_config(str(src), tmp_path / "a" / "out", **options)
    assert recipe is not None  # converted here, not handed on
    a, b, c = (tmp_path / x / "out" for x in "abc")
    assert recipe == in_memory(monkeypatch, str(src), b, **options)
    assert_same_folder(a, b)
    assert recipe == streamed(monkeypatch, str(src), c, **options)
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in c.iterdir())
    for path in a.iterdir():
        if path.suffix != ".safetensors":
            assert path.read_text() == (c / path.name).read_text(), path.name
        else:
            assert path.read_bytes() == (c / path.name).read_bytes(), path.name
    assert {t.dtype for t in tensors(a).values()} == {dtype}


def test_an_older_config_loads_to_the_same_config(tmp_path, monkeypatch):
    """A config.json from an older transformers (torch_dtype, no head_dim): the values the plan changes
    are set in it, and it loads to what the in-memory path's save_pretrained writes."""
    src = sharded(tmp_path, "llama", tf.LlamaForCausalLM, torch.bfloat16, {})
    raw = json.loads((src / "config.json").read_text())
    raw["torch_dtype"] = raw.pop("dtype")
    del raw["head_dim"]
    (src / "config.json").write_text(json.dumps(raw))
    options = dict(heads=8, depth=4, keep_head_dim=True, select="uniform")
    assert convert_from_config(str(src), tmp_path / "a", **options) is not None
    in_memory(monkeypatch, str(src), tmp_path / "b", **options)
    assert_same_folder_tensors(tmp_path / "a", tmp_path / "b")
    loaded = [{**tf.AutoConfig.from_pretrained(tmp_path / f).to_dict(), "_name_or_path": None} for f in "ab"]
    # 8 heads of the source's head dim (keep-head-dim), which the width no longer gives (hidden / 8)
    assert loaded[0] == loaded[1] and loaded[0]["head_dim"] == raw["hidden_size"] // raw["num_attention_heads"]
    assert json.loads((tmp_path / "a" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def assert_same_folder_tensors(a: Path, b: Path) -> None:
    x, y = tensors(a), tensors(b)
    assert x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("why, change, options", [
    ("layers by importance (activations)", None, dict(heads=8, depth=4)),
    ("calibration data", None, dict(heads=8, depth=4, select="uniform", calib="hamlet")),
    ("a fresh model", None, dict(heads=8, depth=4, select="uniform", init="random")),
    ("no heads, depth or keep (the preset or rule of thumb)", None, dict(select="uniform")),
    ("an extra tensor", "extra", dict(heads=8, depth=4, select="uniform")),
    ("remote code", "auto_map", dict(heads=8, depth=4, select="uniform")),
    ("mixed dtypes and none in config.json", "mixed", dict(heads=8, depth=4, select="uniform")),
])
def test_what_it_does_not_describe_goes_to_the_general_path(why, change, options, tmp_path):
    src = sharded(tmp_path, "llama", tf.LlamaForCausalLM, torch.float32, {})
    if change == "extra":
        save_file({"model.extra": torch.zeros(2)}, src / "extra.safetensors")
        index = json.loads((src / "model.safetensors.index.json").read_text())
        index["weight_map"]["model.extra"] = "extra.safetensors"
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
    elif change == "auto_map":
        raw = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**raw, "auto_map": {"AutoModel": "x.Y"}}))
    elif change == "mixed":
        raw = json.loads((src / "config.json").read_text())
        del raw["dtype"]
        (src / "config.json").write_text(json.dumps(raw))
        shard = next(src.glob("model-0000*.safetensors"))
        save_file({k: v.half() for k, v in load_file(shard).items()}, shard, metadata={"format": "pt"})
    out = tmp_path / "outputs" / "out"
    assert convert_from_config(str(src), out, **options) is None, why
    assert not out.parent.exists() or not any(out.parent.iterdir())  # nothing written, no lock left


def test_other_families_go_to_the_general_path(tmp_path):
    src = source(tmp_path, "bert", tf.BertForMaskedLM)
    assert convert_from_config(str(src), tmp_path / "out", heads=8, depth=4, head_split="contiguous") is None
    assert not (tmp_path / "out").exists()


def test_a_non_empty_out_is_refused_as_the_general_path_refuses_it(tmp_path):
    src = sharded(tmp_path, "llama", tf.LlamaForCausalLM, torch.float32, {})
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ReshapeError, match="is not empty"):
        reshape.convert(str(src), out, heads=8, depth=4, select="uniform")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_the_cli_converts_without_importing_transformers(tmp_path):
    src = sharded(tmp_path, "llama", tf.LlamaForCausalLM, torch.bfloat16, {})
    out = tmp_path / "out"
    code = ("import sys; from reshape.cli import main\n"
            f"sys.argv = ['reshape', 'convert', {str(src)!r}, '-o', {str(out)!r}, '--heads', '8', '--depth', '4', "
            "'--select', 'uniform', '--quiet']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'accelerate', 'timm', 'torchvision'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr
    assert tf.LlamaForCausalLM.from_pretrained(out).config.num_attention_heads == 8


def test_the_single_file_shard_size_is_save_pretrained_s_default():
    default = inspect.signature(tf.PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
    assert SAVE_PRETRAINED_SHARD == default
