"""timm Twins (twins_svt_*, twins_pcpvt_*): tiny random-weight variants, rebuilt per stage with timm.create_model.

Checks: a config is claimed and measured without weights; a no-op plan reproduces the outputs; more heads and
fewer blocks give timm's own model (class and count); kept blocks are copied bit for bit and land on a position
of their own attention kind (SVT alternates locally-grouped and global attention); the positional convolution
still follows each stage's first block; a converted folder reloads with plain timm; bad plans are refused in
one line.
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
from reshape.families.timm_twins import TIMM_TWINS

COMMON = dict(img_size=32, embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), num_classes=5)
VARIANTS = {  # arch, model args
    "svt": ("twins_svt_small", dict(COMMON, depths=(2, 2, 4, 2), wss=(2, 2, 2, 2))),
    "pcpvt": ("twins_pcpvt_small", dict(COMMON, depths=(2, 2, 3, 2))),
}
HEADS = [2, 4, 6, 8]  # doubled: head dim 8 in every stage
DEPTH = {"svt": [1, 2, 2, 1], "pcpvt": [1, 2, 2, 1]}
KEPT = {"svt": [[0], [0, 1], [0, 3], [0]], "pcpvt": [[0], [0, 1], [0, 2], [0]]}  # the even spread of DEPTH


def make(variant: str) -> nn.Module:
    arch, args = VARIANTS[variant]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **args).eval()
    with torch.no_grad():  # timm initialises norms and biases to constants: randomise every weight
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(variant) -> nn.Module:
    return make(variant)


@pytest.fixture(scope="module")
def new(model, variant) -> nn.Module:
    return reshape.leaner(model, heads=HEADS, depth=DEPTH[variant])


def kinds(model) -> list[list[str]]:
    return [[type(b.attn).__name__ for b in stage] for stage in model.blocks]


@pytest.mark.parametrize("arch, stages", [
    ("twins_svt_small", [(2, 2, 64, 32), (2, 4, 128, 32), (10, 8, 256, 32), (4, 16, 512, 32)]),
    ("twins_pcpvt_small", [(3, 1, 64, 64), (4, 2, 128, 64), (6, 5, 320, 64), (3, 8, 512, 64)]),
])
def test_claimed_and_inspected_from_a_config_alone(arch, stages):
    config = {"architecture": arch, "model_args": {}}
    family = find_family(config)
    assert family is TIMM_TWINS
    shape = family.shape(config)
    assert [(s.layers, s.heads, s.hidden, s.head_dim) for s in shape.stages] == stages
    svt = arch.startswith("twins_svt")
    assert shape.kinds[2] == (("local", "global") * 5 if svt else ("global",) * 6)
    heads, depth = [2 * s[1] for s in stages], [2, 2, 4, 2]  # an even spread in step for SVT: 10 -> 0,3,6,9
    report = reshape.inspect(arch, heads=heads, depth=depth)
    with torch.device("meta"):
        expected = timm.create_model(arch, depths=tuple(depth), num_heads=tuple(heads))
    assert report["result"]["params"]["total"] == params(expected) < report["source"]["params"]["total"]


def test_keeping_every_block_and_head_reproduces_the_source(model, variant):
    assert torch.equal(run(reshape.leaner(model, depth=list(VARIANTS[variant][1]["depths"]))), run(model))


def test_more_heads_and_fewer_blocks_give_timms_own_model(model, new, variant):
    assert type(new) is type(model)
    assert [[b.attn.num_heads for b in stage] for stage in new.blocks] == [
        [h] * d for h, d in zip(HEADS, DEPTH[variant])]
    assert run(new).shape == (2, 5)
    arch, args = VARIANTS[variant]
    expected = timm.create_model(arch, pretrained=False, **{**args, "depths": tuple(DEPTH[variant]),
                                                             "num_heads": tuple(HEADS)})
    assert params(new) == params(expected)
    assert kinds(new) == kinds(expected)


def test_kept_blocks_are_copied_bit_for_bit_on_a_position_of_their_kind(model, new, variant):
    pairs = [(model.blocks[s][i], new.blocks[s][j]) for s, kept in enumerate(KEPT[variant]) for j, i in enumerate(kept)]
    for old, now in pairs:
        assert type(now.attn) is type(old.attn)
        state, source = now.state_dict(), old.state_dict()
        assert state.keys() == source.keys()
        for key in state:  # qkv, or q, kv (fused [k; v]), sr and its norm; proj, norms, MLP
            assert torch.equal(state[key], source[key]), key
    if variant == "svt":  # stage 2 keeps blocks 0 and 3: local, then global, as timm builds positions 0 and 1
        assert kinds(new)[2] == ["LocallyGroupedAttn", "GlobalSubSampleAttn"]
        assert "attn.kv.weight" in new.blocks[2][1].state_dict() and "attn.sr.weight" in new.blocks[2][1].state_dict()
    outside = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.")}
    assert any(k.startswith("pos_block.") for k in outside) and any(k.startswith("patch_embeds.3") for k in outside)
    state = new.state_dict()
    for key, tensor in outside.items():
        assert torch.equal(state[key], tensor), key


def test_depth_only_equals_the_kept_blocks_run_by_hand(model, variant):
    """The positional convolution still follows each stage's first kept block, which is its block 0."""
    cut = copy.deepcopy(model)
    for k, kept in enumerate(KEPT[variant]):
        cut.blocks[k] = nn.ModuleList([cut.blocks[k][i] for i in kept])
    assert torch.equal(run(reshape.leaner(model, depth=DEPTH[variant])), run(cut))


def test_converted_folder_reloads_with_plain_timm(tmp_path):
    from timm.models import save_for_hf

    model = make("svt")
    new = reshape.leaner(model, heads=HEADS, depth=DEPTH["svt"])
    save_for_hf(model, tmp_path / "src", safe_serialization=True)
    recipe = reshape.convert(tmp_path / "src", tmp_path / "out", heads=HEADS, depth=DEPTH["svt"])
    assert recipe["plan"]["heads"] == HEADS and recipe["plan"]["depth"] == DEPTH["svt"]
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert type(reloaded) is type(model) and params(reloaded) == params(new)
    assert torch.equal(run(reloaded), run(new))


@pytest.mark.parametrize("plan, expected", [
    (dict(heads=HEADS, keep_head_dim=True), "head_mode=keep-head-dim: a timm-twins config cannot express"),
    (dict(heads=HEADS, head_split="aware"), "head_split=aware: is not available for timm-twins"),
    (dict(heads=HEADS, mlp=32), "mlp=32: would give one MLP width to stages of different widths"),
    (dict(heads=[2, 4, 5, 8]), "heads[stage 2]=5: does not divide"),
    (dict(depth=[2, 2, 2, 1], select="last"), "depth=2,2,2,1: drops block 0 of stage 2"),
])
def test_refused_plans_are_one_line(plan, expected):
    with pytest.raises(ReshapeError) as e:
        reshape.leaner(make("svt"), **plan)
    assert len(e.value.problems) == 1 and str(e.value.problems[0]).startswith(expected), str(e.value)
    assert "\n" not in str(e.value)


def test_the_even_spread_is_moved_in_step_with_the_kinds():
    """4 -> 3 blocks spread evenly would keep 0,2,3 and put block 2 (local) on position 1 (global): the
    adapter keeps 0,1,2 instead, each block on a position of its own kind."""
    model = make("svt")
    spec = find_family(model).spec(model)
    plan = reshape.pipeline.plan_for(spec, None, [2, 2, 3, 2])
    assert plan.keep[2] == [0, 1, 2]
    new = reshape.leaner(model, depth=[2, 2, 3, 2])
    assert kinds(new)[2] == ["LocallyGroupedAttn", "GlobalSubSampleAttn", "LocallyGroupedAttn"]
    for j, i in enumerate(plan.keep[2]):
        for name, tensor in model.blocks[2][i].state_dict().items():
            assert torch.equal(new.blocks[2][j].state_dict()[name], tensor), name
