"""timm ConViT through its native adapter (reshape/families/timm_convit.py): tiny random-weight variants.

ConViT's `embed_dim` model arg is the head dim (timm multiplies it by num_heads): SMALL is 4 heads of 16,
width 64, with 2 GPSA blocks then 2 MHSA blocks. Each GPSA head's gate and positional scores are made
distinct, so a new head that took the wrong parent's would show.
"""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from timm.models import save_for_hf

from helpers.timm_outputs import params, run

import reshape
from reshape.errors import ReshapeError
from reshape.families import find_family

SMALL = dict(img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=4, local_up_to_layer=2, num_classes=5)
PER_HEAD = ("attn.gating_param", "attn.pos_proj.weight", "attn.pos_proj.bias")


def convit(**args) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("convit_tiny", pretrained=False, **{**SMALL, **args}).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.blocks:
            if block.use_gpsa:
                block.attn.gating_param.copy_(torch.randn(block.attn.gating_param.shape, generator=g))
                block.attn.pos_proj.weight.mul_(torch.rand(block.attn.pos_proj.weight.shape, generator=g) + 0.5)
                block.attn.pos_proj.bias.copy_(torch.randn(block.attn.pos_proj.bias.shape, generator=g))
    return model


def kinds(model) -> list[str]:
    return [type(block.attn).__name__ for block in model.blocks]


def test_convit_is_claimed_natively_and_its_shape_read():
    model = convit()
    family = find_family(model)
    assert family.name == "timm-convit"
    shape = family.shape(family.spec(model).config)
    assert (shape.layers, shape.heads, shape.head_dim, shape.hidden, shape.mlp) == (4, 4, 16, 64, 256)
    assert shape.gpsa_layers == 2 and "gpsa_layers" not in shape.to_dict()


def test_keeping_every_layer_and_head_reproduces_the_source():
    model = convit()
    run(model)  # the source's rel_indices cache is filled: the copy must not depend on it
    new = reshape.leaner(model, heads=4, depth=4)
    assert torch.equal(run(new), run(model))
    assert new.blocks[0].attn.rel_indices is not model.blocks[0].attn.rel_indices


@pytest.mark.parametrize("plan, timm_args, keep", [
    (dict(heads=8, depth=3), dict(num_heads=8, embed_dim=8, depth=3, local_up_to_layer=1), [0, 2, 3]),
    (dict(heads=8, keep=[0, 1, 3]), dict(num_heads=8, embed_dim=8, depth=3, local_up_to_layer=2), [0, 1, 3]),
    (dict(heads=8, keep=[2, 3]), dict(num_heads=8, embed_dim=8, depth=2, local_up_to_layer=0), [2, 3]),
    (dict(heads=16, depth=2, mlp=128, force=True),
     dict(num_heads=16, embed_dim=4, depth=2, local_up_to_layer=1, mlp_ratio=2.0), [0, 3]),
], ids=["uniform", "two-gpsa", "no-gpsa", "mlp"])
def test_more_heads_fewer_layers_match_timms_own_count_and_keep_each_blocks_kind(plan, timm_args, keep):
    model = convit()
    new = reshape.leaner(model, **plan)
    assert type(new) is type(model)
    assert run(new).shape == (2, 5) and torch.isfinite(run(new)).all()
    assert params(new) == params(timm.create_model("convit_tiny", pretrained=False, **{**SMALL, **timm_args}))
    assert new.embed_dim == 64 and all(block.attn.num_heads == plan["heads"] for block in new.blocks)
    assert kinds(new) == [kinds(model)[i] for i in keep]
    assert new.local_up_to_layer == timm_args["local_up_to_layer"]


def test_kept_blocks_are_copied_bit_for_bit_and_per_head_tensors_follow_each_new_heads_parent():
    model = convit()
    new = reshape.leaner(model, heads=8, depth=3)  # keeps blocks 0 (GPSA), 2, 3 (MHSA)
    parents = torch.tensor([j * 4 // 8 for j in range(8)])  # 0, 0, 1, 1, 2, 2, 3, 3
    for i, j in enumerate([0, 2, 3]):
        old, copied = model.blocks[j].state_dict(), new.blocks[i].state_dict()
        assert copied.keys() == old.keys()
        for key, tensor in copied.items():
            expected = old[key][parents] if key in PER_HEAD else old[key]
            assert torch.equal(tensor, expected), key
    old_attn, attn = model.blocks[0].attn, new.blocks[0].attn
    assert attn.gating_param.shape == (8,) and attn.pos_proj.weight.shape == (8, 3)
    for j in range(8):  # explicitly, against a rule such as j % 4
        assert attn.gating_param[j] == old_attn.gating_param[j // 2]
        assert torch.equal(attn.pos_proj.weight[j], old_attn.pos_proj.weight[j // 2])
        assert attn.pos_proj.bias[j] == old_attn.pos_proj.bias[j // 2]
    old_state, state = model.state_dict(), new.state_dict()
    assert all(torch.equal(t, old_state[k]) for k, t in state.items() if not k.startswith("blocks."))


def test_with_positional_attention_only_the_per_head_rule_is_exact():
    """With every gate saturated, GPSA attends by position only: each new head has its parent's
    attention and reads its own slice of the parent's values, so the blocks compute what they did.
    A new head taking another head's gate or pos_proj row would change the output."""
    model = convit(local_up_to_layer=4, global_pool="avg")  # GPSA only, and no class token
    with torch.no_grad():
        for block in model.blocks:
            block.attn.gating_param.fill_(40.0)
    new = reshape.leaner(model, heads=8, depth=4)
    assert kinds(new) == ["GPSA"] * 4
    torch.testing.assert_close(run(new), run(model), rtol=0, atol=1e-5)
    wrong = copy.deepcopy(new)
    with torch.no_grad():  # a j % 4 rule instead of j * 4 // 8
        for block, src in zip(wrong.blocks, model.blocks):
            block.attn.pos_proj.weight.copy_(src.attn.pos_proj.weight[torch.arange(8) % 4])
            block.attn.pos_proj.bias.copy_(src.attn.pos_proj.bias[torch.arange(8) % 4])
    assert not torch.allclose(run(wrong), run(model), atol=1e-3)


@pytest.mark.parametrize("keep", [(0, 3), (2, 3), (1, 2)])
def test_depth_only_equals_the_kept_blocks_run_by_hand(keep):
    model = convit()
    cut = copy.deepcopy(model)
    cut.blocks = torch.nn.ModuleList([cut.blocks[i] for i in keep])
    cut.local_up_to_layer = sum(i < 2 for i in keep)  # the class token enters before the first kept MHSA
    assert torch.equal(run(reshape.leaner(model, keep=list(keep))), run(cut))


def test_a_source_with_only_gpsa_blocks_keeps_them_all_gpsa():
    model = convit(local_up_to_layer=10)  # timm's default for convit_*: more than the depth
    new = reshape.leaner(model, heads=8, keep=[0, 1])
    assert kinds(new) == ["GPSA", "GPSA"] and new.local_up_to_layer == 2


@pytest.mark.parametrize("plan, message", [
    (dict(heads=8, keep=[0, 1]), "keeps none of the MHSA blocks 2..3"),
    (dict(heads=4, depth=2, select="first"), "keeps none of the MHSA blocks 2..3"),
    (dict(heads=6, depth=2, force=True), "does not divide the attention width 64"),
    (dict(heads=8, depth=2, keep_head_dim=True), "cannot express an attention width"),
    (dict(heads=8, depth=2, head_split="aware"), "is not available for timm-convit"),
], ids=["only-gpsa-kept", "first", "not-a-divisor", "keep-head-dim", "aware"])
def test_bad_plans_are_refused_in_one_line(plan, message):
    with pytest.raises(ReshapeError) as e:
        reshape.leaner(convit(), **plan)
    assert message in str(e.value) and len(e.value.problems) == 1
    assert "\n" not in str(e.value.problems[0])


def test_converted_folder_reloads_with_plain_timm(tmp_path):
    model = convit()
    save_for_hf(model, tmp_path / "src", safe_serialization=True)
    recipe = reshape.convert(tmp_path / "src", tmp_path / "out", heads=8, depth=3)
    assert recipe["family"] == "timm-convit"
    args = json.loads((tmp_path / "out" / "config.json").read_text())["model_args"]
    assert (args["num_heads"], args["embed_dim"], args["depth"], args["local_up_to_layer"]) == (8, 8, 3, 1)
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert kinds(reloaded) == ["GPSA", "MHSA", "MHSA"] and reloaded.blocks[0].attn.num_heads == 8
    assert params(reloaded) == recipe["params"]["result"]["total"]
    assert torch.equal(run(reloaded), run(reshape.leaner(model, heads=8, depth=3)))
