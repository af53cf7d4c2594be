"""timm Swin Transformer V2 (swinv2_*): tiny random-weight variants, rebuilt per stage with timm.create_model.

Checks: a no-op plan reproduces the outputs; more heads and fewer blocks give timm's own model (class and
count); each new head takes its parent head's logit scale and position-bias MLP row; everything else in a
kept block, and everything outside the blocks (patch merging at the start of stages 1-3), is copied bit for
bit; the non-persistent buffers are the new model's own; a converted folder reloads with plain timm.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from helpers.timm_outputs import params, run

import reshape
from reshape.errors import ReshapeError
from reshape.families import find_family
from reshape.families.timm_swinv2 import TIMM_SWINV2

ARGS = dict(img_size=32, window_size=2, embed_dim=32, depths=(2, 2, 4, 2), num_heads=(1, 2, 4, 8), num_classes=5)
HEADS, DEPTH = [2, 4, 16, 16], [1, 2, 2, 1]  # doubled, x4 in stage 2 (head dim 8), x2 in stage 3
PER_HEAD = ("attn.logit_scale", "attn.cpb_mlp.2.weight")


def make() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, **ARGS).eval()
    with torch.no_grad():  # timm initialises norms, biases and scales to constants: randomise every weight
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return make()


@pytest.fixture(scope="module")
def new(model) -> nn.Module:
    return reshape.leaner(model, heads=HEADS, depth=DEPTH)


def test_claimed_from_a_config_without_building_it_on_the_cpu():
    """The meta skeleton used to crash ("Cannot copy out of meta tensor"): timm fills its buffers by copying."""
    config = {"architecture": "swinv2_tiny_window8_256", "model_args": {}}
    family = find_family(config)
    assert family is TIMM_SWINV2
    assert [(s.layers, s.heads, s.hidden, s.head_dim) for s in family.shape(config).stages] == [
        (2, 3, 96, 32), (2, 6, 192, 32), (6, 12, 384, 32), (2, 24, 768, 32)]
    report = reshape.inspect("swinv2_tiny_window8_256", heads=[6, 12, 24, 48], depth=[2, 2, 4, 2])
    with torch.device("meta"):
        expected = timm.create_model("swinv2_tiny_window8_256", depths=(2, 2, 4, 2), num_heads=(6, 12, 24, 48))
    assert report["result"]["params"]["total"] == params(expected) < report["source"]["params"]["total"]


def test_keeping_every_block_and_head_reproduces_the_source(model):
    assert torch.equal(run(reshape.leaner(model, depth=list(ARGS["depths"]))), run(model))


def test_more_heads_and_fewer_blocks_give_timms_own_model(model, new):
    assert type(new) is type(model)
    assert [[b.attn.num_heads for b in stage.blocks] for stage in new.layers] == [[2], [4, 4], [16, 16], [16]]
    assert run(new).shape == (2, 5)
    expected = timm.create_model("swinv2_tiny_window8_256", pretrained=False,
                                 **{**ARGS, "depths": tuple(DEPTH), "num_heads": tuple(HEADS)})
    assert params(new) == params(expected)
    # The non-persistent buffers are the new model's own, as timm computes them for its shape.
    mine, timms = dict(new.named_buffers()), dict(expected.named_buffers())
    assert mine.keys() == timms.keys()
    for name, buffer in mine.items():
        assert buffer.device.type == "cpu" and torch.equal(buffer, timms[name]), name


def _kept(model, new):
    """(source block, new block) pairs: the plan keeps the first and last block of each stage."""
    keep = [[0], [0, 1], [0, 3], [0]]
    return [(model.layers[s].blocks[i], new.layers[s].blocks[j])
            for s, kept in enumerate(keep) for j, i in enumerate(kept)]


def test_each_new_head_takes_its_parent_heads_logit_scale_and_position_bias_row(model, new):
    for old, now in _kept(model, new):
        old_heads, new_heads = old.attn.num_heads, now.attn.num_heads
        parents = [j * old_heads // new_heads for j in range(new_heads)]  # the head holding its first channel
        assert now.attn.cpb_mlp[2].bias is None  # one row per head, nothing else
        for name in PER_HEAD:
            source, result = old.get_parameter(name), now.get_parameter(name)
            assert result.shape[0] == new_heads
            for j, parent in enumerate(parents):
                assert torch.equal(result[j], source[parent]), (name, j, parent)
    # Not the same tensor tiled: in the 4 -> 16 stage, heads 1-3 are head 0's, head 4 is head 1's.
    old, now = model.layers[2].blocks[0].attn, new.layers[2].blocks[0].attn
    assert torch.equal(now.logit_scale[:4], old.logit_scale[:1].expand(4, 1, 1))
    assert not torch.equal(now.logit_scale[1], old.logit_scale[1])


def test_everything_else_is_copied_bit_for_bit(model, new):
    for old, now in _kept(model, new):
        state, source = now.state_dict(), old.state_dict()
        assert state.keys() == source.keys()
        for key in state.keys() - {n for n in PER_HEAD}:  # qkv, q_bias/v_bias, proj, cpb_mlp.0, norms, MLP
            assert torch.equal(state[key], source[key]), key
    outside = {k: v for k, v in model.state_dict().items() if ".blocks." not in k}
    assert any(".downsample." in k for k in outside) and "layers.0.downsample.reduction.weight" not in outside
    state = new.state_dict()
    for key, tensor in outside.items():
        assert torch.equal(state[key], tensor), key


def test_depth_only_equals_the_kept_blocks_run_by_hand(model):
    """Patch merging runs at the start of a stage in v2: the kept blocks must follow it, not precede it."""
    cut = copy.deepcopy(model)
    for stage, kept in zip(cut.layers, [[0], [0, 1], [0, 3], [0, 1]]):
        stage.blocks = nn.ModuleList([stage.blocks[i] for i in kept])
    assert torch.equal(run(reshape.leaner(model, depth=[1, 2, 2, 2])), run(cut))


def test_converted_folder_reloads_with_plain_timm(model, new, tmp_path):
    from timm.models import save_for_hf

    save_for_hf(model, tmp_path / "src", safe_serialization=True)
    recipe = reshape.convert(tmp_path / "src", tmp_path / "out", heads=HEADS, depth=DEPTH)
    assert recipe["plan"]["heads"] == HEADS and recipe["plan"]["depth"] == DEPTH
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert type(reloaded) is type(model) and params(reloaded) == params(new)
    assert torch.equal(run(reloaded), run(new))


@pytest.mark.parametrize("plan, expected", [
    (dict(heads=HEADS, keep_head_dim=True), "head_mode=keep-head-dim: a timm-swinv2 config cannot express"),
    (dict(heads=HEADS, head_split="aware"), "head_split=aware: is not available for timm-swinv2"),
    (dict(heads=HEADS, mlp=32), "mlp=32: would resize MLPs in stages of different widths"),
    (dict(heads=[2, 4, 8, 6]), "heads[stage 3]=6: does not divide"),
])
def test_refused_plans_are_one_line(model, plan, expected):
    with pytest.raises(ReshapeError) as e:
        reshape.leaner(model, **plan)
    assert len(e.value.problems) == 1 and str(e.value.problems[0]).startswith(expected)
