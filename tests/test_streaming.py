"""Streaming conversion (reshape/streaming.py): the folder it writes equals the in-memory path's, tensor
for tensor, on tiny checkpoints of several shards; it reads one block at a time; bad files are refused in
one line before anything is written; and which runs stream. The runs that need activations (Block
Influence, the aware head split) are in tests/test_calibration_stream.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from helpers.streaming import assert_same_folder, in_memory, source, streamed, tensors, timm_source

import reshape
import reshape.pipeline
import reshape.streaming
from reshape.cli import app
from reshape.pipeline import by_importance, plan_for
from reshape.source import load_timm_folder, open_source

# (model type, head class, dtype, convert options): each family's layout rule once, with the variants
# that touch the weights differently (keep-head-dim, --mlp, --keep/--select, tied heads, GQA, fused Q/K/V).
CASES = {
    "bert": ("bert", None, torch.float32, dict(heads=8, keep=[0, 2, 5], mlp=48, head_split="contiguous")),
    "bert-mlm-tied": ("bert", tf.BertForMaskedLM, torch.bfloat16, dict(heads=8, depth=4, head_split="contiguous")),
    "distilbert": ("distilbert", None, torch.float32, dict(heads=8, depth=3, mlp=64, head_split="contiguous")),
    "deberta-v2": ("deberta-v2", None, torch.float32, dict(heads=8, depth=4, mlp=48, head_split="contiguous")),
    "deberta-interleaved": ("deberta", None, torch.float32, dict(heads=8, depth=4, head_split="contiguous")),
    "gpt2-tied": ("gpt2", tf.GPT2LMHeadModel, torch.bfloat16, dict(heads=8, depth=4, mlp=48, select="uniform",
                                                                 head_split="contiguous")),
    "gpt_neox-interleaved": ("gpt_neox", None, torch.float32, dict(heads=8, depth=4, mlp=64, select="first")),
    "llama-gqa": ("llama", tf.LlamaForCausalLM, torch.bfloat16, dict(heads=8, depth=4, mlp=64, select="uniform")),
    "llama-keep-head-dim": ("llama", tf.LlamaForCausalLM, torch.bfloat16,
                            dict(heads=8, keep=[0, 3, 5], keep_head_dim=True)),
    "qwen3-keep-head-dim": ("qwen3", None, torch.float16, dict(heads=8, depth=4, keep_head_dim=True, select="last")),
    "mistral": ("mistral", None, torch.float32, dict(heads=8, keep=[1, 2, 4], mlp=48)),
    "mpnet-shared-bias": ("mpnet", None, torch.float32, dict(heads=8, depth=4, head_split="contiguous")),
    "albert-shared-layer": ("albert", None, torch.float32, dict(heads=8, depth=4, head_split="contiguous")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_folder_equals_the_in_memory_one(case, tmp_path, monkeypatch):
    model_type, head, dtype, options = CASES[case]
    src = source(tmp_path, model_type, head, dtype)
    assert len(list(src.glob("*.safetensors"))) >= 3
    streamed(monkeypatch, str(src), tmp_path / "streamed", **options)
    in_memory(monkeypatch, str(src), tmp_path / "in-memory", **options)
    assert_same_folder(tmp_path / "streamed", tmp_path / "in-memory")
    assert {t.dtype for t in tensors(tmp_path / "streamed").values() if t.is_floating_point()} == {dtype}


# (architecture, tiny model args, convert options): the timm families with one block stack, each with the
# variants that touch its weights differently (aware split fitted block by block, --mlp, --keep/--select,
# keep-head-dim through XCiT's wide attention, CaiT's talking-heads rule, ConViT's per-head gates, TNT's
# inner attention kept whole). A timm folder holds one model.safetensors: timm loads no shards.
TIMM_CASES = {
    "vit-contiguous-mlp-keep": ("vit_tiny_patch16_224", dict(img_size=16, patch_size=4, embed_dim=64, depth=6,
                                num_heads=4, num_classes=5), dict(heads=8, keep=[0, 2, 5], mlp=96,
                                                                  head_split="contiguous")),
    "vit-aware-first": ("vit_tiny_patch16_224", dict(img_size=16, patch_size=4, embed_dim=64, depth=6, num_heads=4,
                        num_classes=5), dict(heads=8, depth=3, select="first")),
    "deit-distilled-last": ("deit_tiny_distilled_patch16_224", dict(img_size=32, depth=4, embed_dim=64, num_heads=4,
                            num_classes=5), dict(heads=8, depth=3, mlp=100, select="last")),
    "eva-swiglu-mlp": ("eva02_tiny_patch14_224", dict(img_size=28, depth=3, embed_dim=96, num_heads=3, num_classes=5,
                       qkv_fused=False, swiglu_align_to=8), dict(heads=6, depth=2, mlp=128, select="last")),
    "xcit-keep-head-dim": ("xcit_nano_12_p16_224", dict(img_size=32, depth=4, num_classes=5),
                           dict(heads=8, depth=3, keep_head_dim=True)),
    "cait-talking-heads": ("cait_xxs24_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4,
                           num_classes=5, init_values=0.5), dict(heads=8, keep=[0, 3], mlp=100)),
    "convit": ("convit_tiny", dict(img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=4, local_up_to_layer=2,
               num_classes=5), dict(heads=8, depth=3, mlp=40, select="first")),
    "tnt-mlp": ("tnt_s_patch16_224", dict(img_size=32, depth=4, embed_dim=96, num_classes=5),
                dict(heads=6, depth=3, mlp=200)),
}


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_streamed_timm_folder_equals_the_in_memory_one(case, tmp_path, monkeypatch):
    architecture, args, options = TIMM_CASES[case]
    src = timm_source(tmp_path, architecture, **args)
    streamed(monkeypatch, str(src), tmp_path / "streamed", **options)
    in_memory(monkeypatch, str(src), tmp_path / "in-memory", **options)
    assert sorted(p.name for p in (tmp_path / "streamed").iterdir()) == \
        sorted(p.name for p in (tmp_path / "in-memory").iterdir())
    assert_same_folder(tmp_path / "streamed", tmp_path / "in-memory")
    # It loads as reshape loads a timm folder (timm.create_model, or reshape's build for XCiT's wide attention).
    size = args["img_size"]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    outputs = []
    for folder in ("streamed", "in-memory"):
        with torch.no_grad():
            outputs.append(load_timm_folder(tmp_path / folder).eval()(images))
    assert torch.equal(*outputs)


def test_a_sharded_timm_folder_is_refused_as_before(tmp_path, monkeypatch):
    """timm loads model.safetensors only: a timm folder of shards gets the in-memory path's refusal."""
    src = timm_source(tmp_path, "vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=4)
    state = tensors(src)
    names = sorted(state)
    (src / "model.safetensors").unlink()
    for i, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
        save_file({k: state[k] for k in part}, src / f"model-0000{i + 1}-of-00002.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f"model-0000{1 + (k in names[len(names) // 2:])}-of-00002.safetensors" for k in names}}))
    errors = []
    for convert in (streamed, in_memory):
        with pytest.raises(reshape.ReshapeError) as e:
            convert(monkeypatch, str(src), tmp_path / convert.__name__, heads=8, depth=1, head_split="contiguous")
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "looked for model.safetensors)" in errors[0]


def test_output_shards_take_the_source_shard_size_with_an_index(tmp_path, monkeypatch):
    src = source(tmp_path, "llama", tf.LlamaForCausalLM)
    largest = max(p.stat().st_size for p in src.glob("*.safetensors"))
    streamed(monkeypatch, str(src), tmp_path / "out", heads=8, depth=4, select="uniform")
    shards = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(shards) >= 3 and all(p.stat().st_size <= largest + 4096 for p in shards)  # + the header
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors(tmp_path / "out").values())


def test_a_single_file_source_gives_a_single_file(tmp_path, monkeypatch):
    src = source(tmp_path, "bert", shard="50GB")
    streamed(monkeypatch, str(src), tmp_path / "out", heads=8, depth=3, head_split="contiguous")
    in_memory(monkeypatch, str(src), tmp_path / "in-memory", heads=8, depth=3, head_split="contiguous")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in (tmp_path / "in-memory").iterdir())
    assert_same_folder(tmp_path / "out", tmp_path / "in-memory")


@pytest.mark.parametrize("model_type, head", [("llama", tf.LlamaForCausalLM), ("gpt2", tf.GPT2LMHeadModel)])
def test_streamed_folder_loads_with_plain_from_pretrained(model_type, head, tmp_path, monkeypatch):
    src = source(tmp_path, model_type, head, torch.bfloat16)
    options = dict(heads=8, depth=4, mlp=48, select="uniform", head_split="contiguous")
    streamed(monkeypatch, str(src), tmp_path / "streamed", **options)
    in_memory(monkeypatch, str(src), tmp_path / "in-memory", **options)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    logits = []
    for folder in ("streamed", "in-memory"):
        model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / folder).eval()
        assert model.dtype == torch.bfloat16
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    assert torch.equal(*logits)


def test_one_block_at_a_time_and_dropped_layers_never_read(tmp_path, monkeypatch):
    src = source(tmp_path, "llama", tf.LlamaForCausalLM)
    reads, blocks = [], []
    get, transfer = reshape.streaming.Checkpoint.get, reshape.streaming.transfer_block
    monkeypatch.setattr(reshape.streaming.Checkpoint, "get", lambda self, key, dtype: reads.append(key) or get(self, key, dtype))
    monkeypatch.setattr(reshape.streaming, "transfer_block", lambda layer, *a: blocks.append(sorted(layer)) or transfer(layer, *a))
    streamed(monkeypatch, str(src), tmp_path / "out", heads=8, keep=[0, 2, 5])
    layers = [int(key.split(".")[2]) for key in reads if key.startswith("model.layers.")]
    assert layers == sorted(layers) and set(layers) == {0, 2, 5}  # in order, each kept block read once
    assert len(reads) == len(set(reads)) and len(blocks) == 3


@pytest.mark.parametrize("model_type, head, options, streams", [
    ("bert", None, dict(), True),  # the rule of thumb doubles the heads: aware split, fitted block by block
    ("bert", None, dict(head_split="contiguous"), True),
    ("bert", None, dict(depth=4), True),  # heads kept: nothing to split
    ("llama", tf.LlamaForCausalLM, dict(depth=4), True),  # a decoder's layers are picked by Block Influence
    ("albert", None, dict(depth=4), True),
    ("albert", None, dict(depth=4, select="importance"), False),  # its one block runs at every depth
    ("llama", tf.LlamaForCausalLM, dict(depth=4, select="uniform"), True),
    ("llama", tf.LlamaForCausalLM, dict(keep=[0, 1, 5]), True),
    ("llama", tf.LlamaForCausalLM, dict(depth=4, select="uniform", init="random"), False),
    ("mixtral", None, dict(depth=4, select="uniform"), False),  # experts fused on load, unfused on save
    ("vit", None, dict(depth=4, head_split="contiguous"), False),  # attention renamed on load and back on save
])
def test_which_runs_stream(model_type, head, options, streams, tmp_path):
    src = open_source(str(source(tmp_path, model_type, head)))
    plan = plan_for(src.spec, options.pop("heads", None), options.pop("depth", None), src.preset, **options)
    assert reshape.streaming.can_stream(src, plan, importance=by_importance(src.spec, options), calib=None) is streams


VIT = ("vit_tiny_patch16_224", dict(img_size=16, patch_size=4, embed_dim=64, depth=6, num_heads=4))


@pytest.mark.parametrize("architecture, args, options, streams", [
    (*VIT, dict(), True),  # the rule of thumb doubles the heads: aware split, fitted block by block
    (*VIT, dict(depth=4, select="importance"), True),
    (*VIT, dict(depth=4, init="random"), False),
    # per-stage plans (several block stacks, transfer_stages): in memory
    ("davit_tiny", dict(depths=(1, 1, 3, 1), embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), window_size=2),
     dict(depth=[1, 1, 2, 1]), False),
])
def test_which_timm_runs_stream(architecture, args, options, streams, tmp_path):
    src = open_source(str(timm_source(tmp_path, architecture, **args)))
    plan = plan_for(src.spec, options.pop("heads", None), options.pop("depth", None), src.preset, **options)
    assert reshape.streaming.can_stream(src, plan, importance=by_importance(src.spec, options), calib=None) is streams


def test_a_timm_folder_whose_tensors_timm_adapts_on_load_stays_in_memory(tmp_path):
    folder = timm_source(tmp_path, VIT[0], **VIT[1])
    config = json.loads((folder / "config.json").read_text())
    config["model_args"]["img_size"] = 32  # timm resamples the saved position embeddings on load
    (folder / "config.json").write_text(json.dumps(config))
    src = open_source(str(folder))
    plan = plan_for(src.spec, 8, 3, None, head_split="contiguous")
    assert not reshape.streaming.can_stream(src, plan, importance=False, calib=None)


def test_calibration_data_streams_too(tmp_path):
    src = open_source(str(source(tmp_path, "bert")))
    plan = plan_for(src.spec, None, 4, None)
    assert reshape.streaming.can_stream(src, plan, importance=False, calib=None)
    assert reshape.streaming.can_stream(src, plan, importance=True, calib="hamlet")


def test_a_checkpoint_with_extra_weights_keeps_the_in_memory_path(tmp_path):
    folder = source(tmp_path, "bert", shard="50GB")
    state = tensors(folder)
    save_file({**state, "stray.weight": torch.zeros(2)}, folder / "model.safetensors", metadata={"format": "pt"})
    src = open_source(str(folder))
    assert not reshape.streaming.can_stream(src, plan_for(src.spec, None, 4, None), importance=False, calib=None)


# --- bad input: one line naming the file and the fix, exit 2, nothing written ---------------------


def rewrite(path: Path, change) -> None:
    state = tensors_of(path)
    save_file(change(state), path, metadata={"format": "pt"})


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def holding(folder: Path, key: str) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][key]


def truncate(folder: Path) -> str:
    path = holding(folder, "model.layers.1.mlp.up_proj.weight")
    path.write_bytes(path.read_bytes()[:-100])
    return path.name


def delete(folder: Path) -> str:
    path = holding(folder, "model.layers.1.mlp.up_proj.weight")
    path.unlink()
    return path.name


def index_names_a_missing_file(folder: Path) -> str:
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    index_path.write_text(json.dumps(index))
    return "model-00099-of-00099.safetensors"


def wrong_shape(folder: Path) -> str:
    key = "model.layers.2.self_attn.k_proj.weight"
    rewrite(holding(folder, key), lambda s: {**s, key: s[key].t().contiguous()})
    return holding(folder, key).name


def wrong_dtype(folder: Path) -> str:
    key = "model.layers.2.self_attn.k_proj.weight"
    rewrite(holding(folder, key), lambda s: {**s, key: s[key].to(torch.int32)})
    return holding(folder, key).name


def pickle_shard(folder: Path) -> str:
    path = holding(folder, "model.layers.1.mlp.up_proj.weight")
    torch.save(tensors_of(path), folder / "pytorch_model-00002.bin")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: "pytorch_model-00002.bin" if v == path.name else v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    path.unlink()
    return "pytorch_model-00002.bin"


@pytest.mark.parametrize("damage", [truncate, delete, index_names_a_missing_file, wrong_shape, wrong_dtype,
                                    pickle_shard])
def test_bad_files_are_refused_in_one_line_before_anything_is_written(damage, tmp_path):
    folder = source(tmp_path, "llama", tf.LlamaForCausalLM)
    name = damage(folder)
    out = tmp_path / "outputs" / "out"
    result = CliRunner().invoke(app, ["convert", str(folder), "-o", str(out), "--heads", "8",
                                                  "--depth", "4", "--select", "uniform", "--quiet"],
                                env={"COLUMNS": "1000", "NO_COLOR": "1"})
    logging.getLogger().handlers.clear()  # the CLI bound its log handler to the runner's stream
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and name in errors[0] and "; " in errors[0], result.output
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no OUT, no lock, no temporary folder
