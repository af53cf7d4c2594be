"""Calibration one block at a time (reshape/blockwise.py): Block Influence and the aware split's
covariances of a safetensors folder, computed with one block read at a time, equal the in-memory
computation bit for bit (each block's output too), on padded batches of two lengths, for encoders and
for rotary decoders with grouped KV heads; a runner that gave the blocks a wrong mask or no rotary
embeddings would not; `convert` then streams these runs to the in-memory path's folder, and falls
back to the model in memory where the model's loop cannot be replayed block by block."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers as tf
from typer.testing import CliRunner

from helpers.streaming import assert_same_folder, in_memory, source, streamed

import reshape
import reshape.blockwise
import reshape.pipeline
from reshape.blockwise import BlockRunner, NotBlockwise
from reshape.cli import app
from reshape.headsplit import attention_input_covariances
from reshape.importance import layer_scores
from reshape.pipeline import by_importance, plan_for
from reshape.source import load_model, open_source
from reshape.streaming import Checkpoint, can_stream, layers_prefix, load_dtype, skeleton
from reshape.testing import tiny_model

# model type, head class, padding side (left for decoders: right padding never reaches a causal
# model's real tokens, so a lost mask would go unseen)
MODELS = {
    "bert": ("bert", None, "right"),
    "distilbert": ("distilbert", None, "right"),
    "deberta-v2": ("deberta-v2", None, "right"),  # relative positions, made once before the stack
    "mpnet": ("mpnet", None, "right"),  # relative position bias, made once before the stack
    "gpt2": ("gpt2", tf.GPT2LMHeadModel, "left"),  # positional arguments, tied head
    "llama-gqa": ("llama", tf.LlamaForCausalLM, "left"),  # rotary, 4 heads over 2 KV heads
    "qwen3": ("qwen3", tf.Qwen3ForCausalLM, "left"),  # rotary, q/k norms, per-layer mask table
    "gpt_neox": ("gpt_neox", None, "left"),  # partial rotary, parallel residual
}


def padded_batches(vocab: int, side: str) -> list[dict]:
    """Two batches of different lengths, two rows of each padded."""
    g = torch.Generator().manual_seed(3)
    batches = []
    for length in (6, 9):
        ids = torch.randint(5, vocab, (3, length), generator=g)
        mask = torch.ones_like(ids)
        if side == "left":
            mask[1:, :3] = 0
        else:
            mask[1:, -3:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def outputs_of(model, layers, batches, run=None) -> list[list[torch.Tensor]]:
    """Every block's output on every batch, as the blocks return them (through the scoring runner)."""
    seen = [[] for _ in layers]
    handles = [block.register_forward_hook(lambda m, a, out, i=i: seen[i].append(out[0] if isinstance(out, tuple)
                                                                                  else out))
               for i, block in enumerate(layers)]
    try:
        layer_scores(model, layers, batches, run=run)
    finally:
        for h in handles:
            h.remove()
    return seen


def both(tmp_path, name):
    """The model in memory and a runner over its folder, with the batches to feed them."""
    model_type, head, side = MODELS[name]
    folder = source(tmp_path, model_type, head)
    src = open_source(str(folder))
    family = src.spec.family
    model = load_model(src)
    checkpoint = Checkpoint(folder, str(folder))
    meta = skeleton(src.spec, load_dtype(getattr(src.spec.config, "dtype", None), checkpoint))
    runner = BlockRunner(meta, family.layers(meta), layers_prefix(meta, family), checkpoint)
    return family, model, meta, runner, padded_batches(src.spec.config.vocab_size, side)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_block_by_block_equals_the_model_in_memory(name, tmp_path):
    family, model, meta, runner, batches = both(tmp_path, name)
    layers, meta_layers = family.layers(model), family.layers(meta)
    expected, got = outputs_of(model, layers, batches), outputs_of(meta, meta_layers, batches, runner)
    assert len(got) == len(expected) == 6 and all(len(g) == len(batches) for g in got)
    for i, (xs, ys) in enumerate(zip(expected, got)):
        for b, (x, y) in enumerate(zip(xs, ys)):
            assert torch.equal(x, y), (i, b, (x - y).abs().max())  # max abs diff 0
    assert layer_scores(meta, meta_layers, batches, run=runner) == layer_scores(model, layers, batches)
    covs = attention_input_covariances(model, layers, family.weights, range(6), batches)
    meta_covs = attention_input_covariances(meta, meta_layers, family.weights, range(6), batches, run=runner)
    assert covs.keys() == meta_covs.keys() == set(range(6))
    assert all(torch.equal(covs[i], meta_covs[i]) for i in covs)
    assert all(t.device.type == "meta" for t in meta.parameters())  # every block freed again


def _no_rotary(kwargs):
    cos, sin = kwargs["position_embeddings"]
    return {**kwargs, "position_embeddings": (torch.ones_like(cos), torch.zeros_like(sin))}


@pytest.mark.parametrize("name, wrong", [
    ("llama-gqa", lambda kwargs: {**kwargs, "attention_mask": None}),
    ("llama-gqa", _no_rotary),
    ("bert", lambda kwargs: kwargs),  # BERT takes its mask as the second positional argument: see below
])
def test_a_wrong_mask_or_missing_rotary_would_be_caught(name, wrong, tmp_path, monkeypatch):
    """The comparison above is sensitive to what each block is given: a runner that lost the mask or
    the rotary embeddings gives other block outputs."""
    family, model, meta, runner, batches = both(tmp_path, name)
    with_hidden = reshape.blockwise._with_hidden

    def broken(args, kwargs, hidden):
        args, kwargs = with_hidden(args, kwargs, hidden)
        if name == "bert":
            return (args[0], None, *args[2:]), kwargs
        return args, wrong(kwargs)

    monkeypatch.setattr(reshape.blockwise, "_with_hidden", broken)
    expected = outputs_of(model, family.layers(model), batches)
    got = outputs_of(meta, family.layers(meta), batches, runner)
    assert torch.equal(expected[0][0], got[0][0])  # block 0 runs inside the model's own forward
    assert not all(torch.equal(x, y) for xs, ys in zip(expected[1:], got[1:]) for x, y in zip(xs, ys))


def test_one_block_at_a_time_and_the_head_never_read(tmp_path, monkeypatch):
    family, model, meta, runner, batches = both(tmp_path, "llama-gqa")
    resident: set[int] = set()
    most, names = [0], []
    load, free = BlockRunner._load, BlockRunner._free

    def block_of(name):
        return int(name.split(".")[2]) if name.startswith("model.layers.") else None

    def loading(self, which):
        names.extend(which)
        resident.update(block_of(n) for n in which if block_of(n) is not None)
        most[0] = max(most[0], len(resident))
        return load(self, which)

    def freeing(self, which):
        resident.difference_update(block_of(n) for n in which)
        return free(self, which)

    monkeypatch.setattr(BlockRunner, "_load", loading)
    monkeypatch.setattr(BlockRunner, "_free", freeing)
    layer_scores(meta, family.layers(meta), batches, run=runner)
    assert most[0] == 1 and not resident
    blocks = [block_of(n) for n in names if block_of(n) is not None]
    assert blocks == sorted(blocks) and set(blocks) == set(range(6))  # in turn, each read once
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    start = len(names)
    attention_input_covariances(meta, family.layers(meta), family.weights, [1, 2], batches, run=runner)
    assert {block_of(n) for n in names[start:]} == {None, 0, 1, 2}  # stops at the last block asked for


# --- convert: streamed runs that need activations write the in-memory path's folder --------------

CONVERT = {  # (model type, head, dtype, options)
    "llama-importance": ("llama", tf.LlamaForCausalLM, torch.float32, dict(heads=8, depth=4)),  # the default
    "qwen3-importance-bf16": ("qwen3", None, torch.bfloat16, dict(heads=4, depth=3)),
    "bert-aware": ("bert", None, torch.float32, dict(heads=8, depth=4)),  # aware is the default
    "gpt2-importance-aware": ("gpt2", tf.GPT2LMHeadModel, torch.float32,
                              dict(heads=8, depth=4, mlp=48, select="importance")),
    "mpnet-aware-keep": ("mpnet", None, torch.float32, dict(heads=8, keep=[0, 3, 5])),
}


@pytest.mark.parametrize("case", sorted(CONVERT))
def test_streamed_calibration_writes_the_in_memory_folder(case, tmp_path, monkeypatch):
    model_type, head, dtype, options = CONVERT[case]
    src = source(tmp_path, model_type, head, dtype)
    streamed(monkeypatch, str(src), tmp_path / "streamed", **options)
    in_memory(monkeypatch, str(src), tmp_path / "in-memory", **options)
    assert_same_folder(tmp_path / "streamed", tmp_path / "in-memory")  # the recipes (scores, keep) too


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "play", "is", "a", "king", "ghost", "night"]


def test_cli_convert_with_calibration_text_streams(tmp_path, monkeypatch):
    """`reshape convert FOLDER --select importance --calib FILE` streams, to the in-memory folder."""
    folder = source(tmp_path, "llama", tf.LlamaForCausalLM)
    tf.BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(folder)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(["the play is a ghost", "the king is a night ghost", "a king"] * 7))
    with monkeypatch.context() as m:
        m.setattr(reshape.pipeline, "load_model", lambda *a: pytest.fail("loaded the whole model"))
        result = CliRunner().invoke(app, ["convert", str(folder), "-o", str(tmp_path / "streamed"), "--heads", "8",
                                          "--depth", "3", "--select", "importance", "--calib", str(calib), "--quiet"],
                                    env={"COLUMNS": "1000", "NO_COLOR": "1"})
        logging.getLogger().handlers.clear()  # the CLI bound its log handler to the runner's stream
    assert result.exit_code == 0, result.output
    in_memory(monkeypatch, str(folder), tmp_path / "in-memory", heads=8, depth=3, select="importance",
              calib=str(calib))
    assert_same_folder(tmp_path / "streamed", tmp_path / "in-memory")
    recipe = json.loads((tmp_path / "streamed" / "reshape.json").read_text())
    assert recipe["layer_scores"]["calib"] == str(calib)


def test_a_loop_that_cannot_be_replayed_falls_back_to_memory(tmp_path, monkeypatch, caplog):
    # DeBERTa-v2 with a convolution after its first block: the stand-ins see it change the hidden states.
    folder = tmp_path / "deberta"
    tiny_model("deberta-v2", conv_kernel_size=3).save_pretrained(folder, max_shard_size="40KB")
    src = open_source(str(folder))
    options = dict(heads=8, depth=4, select="importance")
    assert can_stream(src, plan_for(src.spec, 8, 4, None), importance=True, calib=None)  # config.json can't tell
    loads = []
    with monkeypatch.context() as m:
        m.setattr(reshape.pipeline, "load_model", lambda s: loads.append(s) or load_model(s))
        with caplog.at_level(logging.WARNING, logger="reshape"):
            reshape.convert(str(folder), tmp_path / "out", **options)
    assert len(loads) == 1 and "changes the hidden states between blocks 0 and 1" in caplog.text
    in_memory(monkeypatch, str(folder), tmp_path / "in-memory", **options)
    assert_same_folder(tmp_path / "out", tmp_path / "in-memory")


def test_per_layer_masks_are_refused(tmp_path):
    # Qwen2 with sliding-window layers: each layer type gets its own mask from the model's forward.
    model = tf.Qwen2ForCausalLM(tf.Qwen2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                               num_key_value_heads=2, intermediate_size=48, vocab_size=64,
                                               use_sliding_window=True, sliding_window=4, max_window_layers=2))
    folder = tmp_path / "qwen2"
    model.save_pretrained(folder)
    src = open_source(str(folder))
    plan = plan_for(src.spec, None, 3, None)
    assert by_importance(src.spec, {}) and not can_stream(src, plan, importance=True, calib=None)
    assert can_stream(src, plan_for(src.spec, None, 3, None, select="uniform"), importance=False, calib=None)
    # and were config.json silent, the block-by-block run would see it on the model's own forward
    checkpoint = Checkpoint(folder, str(folder))
    meta = skeleton(src.spec, load_dtype(getattr(src.spec.config, "dtype", None), checkpoint))
    layers = src.spec.family.layers(meta)
    with pytest.raises(NotBlockwise, match="gives block 2 other arguments than block 0"):
        layer_scores(meta, layers, padded_batches(64, "left"),
                     run=BlockRunner(meta, layers, layers_prefix(meta, src.spec.family), checkpoint))
