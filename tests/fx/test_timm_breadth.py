"""timm breadth on the fx path (issue 12): the crashes it fixed and the per-head rules it added.

- A block run that starts partway through its container (Hiera, MaxViT) keeps its start when blocks are
  dropped, so the blocks before it are not overwritten, and the folder loads back.
- Tracing leaves the source as it went in: LeViT caches its attention biases on the module when not
  training, which used to keep fx Proxies there and broke a second `reshape.leaner`.
- Swin v2's constructor cannot run on the meta device: the adapters never build it there, so `inspect`
  refuses it in one line and `convert` takes the fx path.
- A learned per-head score bias (BEiT's relative position table) is inherited: every new head adds its
  parent head's, checked against timm's own class built with the new heads.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.fx as fx
from torch import nn

from helpers import fx_models as M

import reshape
from reshape.errors import ReshapeError



def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


def _loud(model):
    """Weights large enough that the attention shows against the residual stream (timm: std 0.02)."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.2)
        if hasattr(module, "gamma"):
            nn.init.ones_(module.gamma)
    for name, p in model.named_parameters():
        if "relative_position_bias_table" in name:
            nn.init.normal_(p, std=1.0)  # distinct per head, so a wrong parent would show
    return model.eval()


@torch.no_grad()
def test_a_run_that_starts_partway_keeps_the_blocks_before_it(tmp_path):
    model, x = M.partial_seeded(), torch.randn(2, 3, 16, 16)
    new = reshape.leaner(model, depth=2)
    assert new.meta["reshape"]["blocks"] == ["blocks.1", "blocks.2"]  # the run took blocks.1 to blocks.4
    assert new.meta["reshape"]["plan"]["keep"] == [0, 3]
    by_hand = M.partial_seeded()
    by_hand.blocks = nn.Sequential(by_hand.blocks[0], by_hand.blocks[1], by_hand.blocks[4])
    close(new(x), by_hand(x), atol=1e-6)
    assert sorted(new.state_dict()) == sorted(by_hand.state_dict())  # blocks.0 kept, the run from blocks.1
    reshape.convert("helpers.fx_models:partial_seeded", tmp_path / "out", heads=4, depth=2, trust_remote_code=True)
    loaded = reshape.load(tmp_path / "out", trust_remote_code=True)
    close(loaded(x), reshape.leaner(M.partial_seeded(), heads=4, depth=2)(x), atol=0)


def _proxies(model):
    found = []
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            values = value.values() if isinstance(value, dict) else [value]
            found += [f"{name}.{key}" for v in values if isinstance(v, fx.Proxy)]
    return found


@torch.no_grad()
def test_levit_twice_and_its_source_unchanged():
    model = timm.create_model("levit_128s", img_size=64, num_classes=0).eval()
    x = torch.randn(1, 3, 64, 64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(x)  # fills LeViT's attention_bias_cache, as eval does
    caches = {name: dict(m.attention_bias_cache) for name, m in model.named_modules()
              if hasattr(m, "attention_bias_cache")}
    attrs = {name: set(vars(m)) for name, m in model.named_modules()}
    first = reshape.leaner(model, depth=3)
    second = reshape.leaner(model, depth=3)  # failed: "Argument 'getitem_6' ... does not belong to this Graph"
    close(first(x), second(x), atol=0)
    assert not _proxies(model)
    assert {name: set(vars(m)) for name, m in model.named_modules()} == attrs  # no _tensor_constant left
    for name, cache in caches.items():
        now = model.get_submodule(name).attention_bias_cache
        assert now.keys() == cache.keys() and all(now[k] is cache[k] for k in cache)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    close(model(x), expected, atol=0)


def test_swin_v2_given_one_depth_is_refused_in_one_line():
    # Swin v2 has its own adapter now (tests/test_timm_swinv2.py): one number for four stages is refused.
    with pytest.raises(ReshapeError) as e:
        reshape.inspect("swinv2_tiny_window8_256", depth=2)
    text = str(e.value)
    assert "\n" not in text and text.startswith("depth=2: is a single number, and timm-swinv2 has 4 stages")


def _beit(heads, **kw):
    return timm.create_model("beit_base_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2,
                             num_heads=heads, num_classes=0, global_pool="", **kw)


@torch.no_grad()
def test_beit_new_heads_inherit_their_parents_relative_position_bias():
    model, x = _loud(_beit(2)), torch.randn(2, 3, 32, 32)
    new = reshape.leaner(model, heads=4)
    doubled = _beit(4).eval()  # timm's own class, 4 heads; each table column repeated for its two children
    doubled.load_state_dict({k: v.repeat_interleave(2, 1) if k.endswith("relative_position_bias_table") else v
                             for k, v in model.state_dict().items()})
    close(new(x), doubled(x))
    assert not torch.allclose(new(x), model(x), atol=1e-3)  # the heads really changed
    # Children of head 0 taking head 1's bias (the wrong parent) gives another function:
    wrong = _beit(4).eval()
    wrong.load_state_dict({k: v[:, [1, 1, 0, 0]] if k.endswith("relative_position_bias_table") else v
                           for k, v in model.state_dict().items()})
    assert not torch.allclose(new(x), wrong(x), atol=1e-3)
    # (a head count that is not a multiple is refused: tests/fx/test_fx.py, the ViT-RelPos case)


@torch.no_grad()
def test_relpos_keep_head_dim_new_heads_copy_their_sources_bias_and_keep_the_function():
    model = _loud(timm.create_model("test_vit_relpos", img_size=32, num_classes=0, global_pool=""))
    x = torch.randn(2, 3, 32, 32)
    new = reshape.leaner(model, heads=6, keep_head_dim=True)  # 3 heads of 32 -> 6 heads of 32
    assert new.blocks.get_submodule("0").attn.qkv.out_features == 3 * 6 * 32
    close(new(x), model(x))


@torch.no_grad()
def test_pvt_v2_block_called_with_a_tuple_of_sizes_re_heads_like_timms_class():
    """PVT v2 calls its blocks with feat_size, a tuple computed in the graph: traced free, not fixed."""
    model, x = _loud(timm.create_model("pvt_v2_b0", num_classes=0)), torch.randn(1, 3, 64, 64)
    new = reshape.leaner(model, heads=16, depth=1)  # the longest stack: the last stage's 2 blocks, 8 heads
    doubled = timm.create_model("pvt_v2_b0", num_classes=0, num_heads=(1, 2, 5, 16)).eval()
    doubled.load_state_dict(model.state_dict())
    doubled.stages[3].blocks = nn.Sequential(doubled.stages[3].blocks[0])  # depth 1 keeps the first block
    close(new(x), doubled(x))
    assert not torch.allclose(new(x), reshape.leaner(model, depth=1)(x), atol=1e-3)  # the heads really changed
