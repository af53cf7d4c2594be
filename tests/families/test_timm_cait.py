"""timm CaiT through its native adapter (reshape/families/timm_cait.py): tiny random-weight variants.

The talking-heads rule: with the new heads a multiple of the old, the main blocks compute exactly what
they did. The class-attention blocks re-read their weights as the new head count, which is not exact,
so the exactness test pools the patch tokens (global_pool="avg"), which only the main blocks produce.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models import save_for_hf

from helpers.timm_outputs import params, run

import reshape
from reshape.errors import ReshapeError
from reshape.families import find_family

SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=5, init_values=0.5)


def cait(**args) -> torch.nn.Module:
    """A tiny CaiT whose talking-heads mixers and logits are large enough for a wrong rule to show."""
    torch.manual_seed(0)
    model = timm.create_model("cait_xxs24_224", pretrained=False, **{**SMALL, **args}).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.blocks:
            for linear in (block.attn.proj_l, block.attn.proj_w):
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=g))
                linear.bias.copy_(torch.randn(linear.bias.shape, generator=g))
            block.attn.qkv.weight.mul_(4)
    return model


def test_cait_is_claimed_natively_and_its_shape_read():
    model = cait()
    family = find_family(model)
    assert family.name == "timm-cait"
    shape = family.shape(family.spec(model).config)
    assert (shape.layers, shape.heads, shape.head_dim, shape.hidden, shape.mlp) == (4, 4, 16, 64, 256)


def test_keeping_every_layer_and_head_reproduces_the_source():
    model = cait()
    assert torch.equal(run(reshape.leaner(model, heads=4, depth=4)), run(model))


@pytest.mark.parametrize("heads", [8, 16])
def test_multiplied_heads_keep_width_are_exact_through_the_talking_heads_rule(heads):
    model = cait(global_pool="avg")  # the output reads the patch tokens: the main blocks alone
    new = reshape.leaner(model, heads=heads, depth=4, force=heads == 16)  # 16 heads: head dim 4
    attn = new.blocks[0].attn
    assert attn.num_heads == heads and attn.proj_l.weight.shape == (heads, heads)
    torch.testing.assert_close(run(new), run(model), rtol=0, atol=1e-5)
    # Without the rule's scales (proj_l by 1/sqrt(k), proj_w by 1/k) the outputs would differ.
    k = heads // 4
    parents = torch.arange(heads) // k
    src = model.blocks[0].attn
    torch.testing.assert_close(attn.proj_l.weight, src.proj_l.weight[parents][:, parents] * k ** -0.5)
    torch.testing.assert_close(attn.proj_w.weight, src.proj_w.weight[parents][:, parents] / k)
    assert torch.equal(attn.proj_l.bias, src.proj_l.bias[parents])
    assert torch.equal(attn.proj_w.bias, src.proj_w.bias[parents])


@pytest.mark.parametrize("plan, timm_args", [
    (dict(heads=8, depth=2), dict(num_heads=8, depth=2)),
    (dict(heads=8, depth=3, mlp=128), dict(num_heads=8, depth=3, mlp_ratio=2.0)),
])
def test_more_heads_fewer_layers_match_timms_own_count(plan, timm_args):
    model = cait()
    new = reshape.leaner(model, **plan)
    assert type(new) is type(model)
    assert run(new).shape == (2, 5) and torch.isfinite(run(new)).all()
    assert params(new) == params(timm.create_model("cait_xxs24_224", pretrained=False, **{**SMALL, **timm_args}))
    # The class-attention blocks take the new head count and keep every weight as it was.
    for old_block, new_block in zip(model.blocks_token_only, new.blocks_token_only):
        assert new_block.attn.num_heads == 8
        old_state = old_block.state_dict()
        assert all(torch.equal(t, old_state[k]) for k, t in new_block.state_dict().items())
    # The kept main blocks keep their layer scales.
    kept = [0, 3] if plan["depth"] == 2 else [0, 2, 3]
    for i, j in enumerate(kept):
        assert torch.equal(new.blocks[i].gamma_1, model.blocks[j].gamma_1)
        assert torch.equal(new.blocks[i].gamma_2, model.blocks[j].gamma_2)


def test_depth_only_equals_the_kept_blocks_run_by_hand():
    model = cait()
    cut = copy.deepcopy(model)
    cut.blocks = torch.nn.Sequential(*[cut.blocks[i] for i in (0, 3)])
    assert torch.equal(run(reshape.leaner(model, depth=2)), run(cut))


@pytest.mark.parametrize("plan, message", [
    (dict(heads=2, depth=2, allow_fewer_heads=True), "is not a multiple of the model's 4 heads"),
    (dict(heads=6, depth=2, force=True), "is not a multiple of the model's 4 heads"),
    (dict(heads=8, depth=2, keep_head_dim=True), "cannot express an attention width"),
    (dict(heads=8, depth=2, head_split="aware"), "is not available for timm-cait"),
], ids=["fewer", "not-a-multiple", "keep-head-dim", "aware"])
def test_heads_the_rule_cannot_split_are_refused_in_one_line(plan, message):
    with pytest.raises(ReshapeError) as e:
        reshape.leaner(cait(embed_dim=96), **plan)
    assert message in str(e.value) and len(e.value.problems) == 1


def test_converted_folder_reloads_with_plain_timm(tmp_path):
    model = cait()
    save_for_hf(model, tmp_path / "src", safe_serialization=True)
    recipe = reshape.convert(tmp_path / "src", tmp_path / "out", heads=8, depth=2)
    assert recipe["family"] == "timm-cait"
    assert recipe["plan"]["head_split"] == "contiguous"
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert reloaded.blocks[0].attn.num_heads == 8 and len(reloaded.blocks) == 2
    assert params(reloaded) == recipe["params"]["result"]["total"]
    assert torch.equal(run(reloaded), run(reshape.leaner(model, heads=8, depth=2)))
