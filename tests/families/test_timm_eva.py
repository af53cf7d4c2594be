"""timm Eva (EVA-02, the RoPE ViTs): tiny random-weight variants through the native adapter."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from helpers.timm_outputs import params

import reshape
from reshape.errors import ReshapeError
from reshape.families import find_family
from reshape.families.timm_eva import TimmEva

# (architecture, small model args, image size)
CASES = {
    # fused qkv without bias, separate q/v biases, GluMlp (one fc1 holding both halves)
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=28, depth=3, embed_dim=96, num_heads=3, num_classes=5), 28),
    # separate q/k/v projections and a SwiGLU with fc1_g / fc1_x
    "eva02-unfused": ("eva02_tiny_patch14_224", dict(img_size=28, depth=3, embed_dim=96, num_heads=3, num_classes=5,
                                                     qkv_fused=False, swiglu_align_to=8), 28),
    # AttentionRope: fused qkv with bias, plain Mlp, layer scale
    "rope-vit": ("vit_small_patch16_rope_224", dict(img_size=32, depth=3, embed_dim=64, num_heads=2, num_classes=5),
                 32),
}


def make(case) -> nn.Module:
    arch, args, _ = CASES[case]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **args).eval()
    with torch.no_grad():  # timm initialises norms, biases and scales to constants: randomise every weight
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def run(model, case) -> torch.Tensor:
    size = CASES[case][2]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model.eval()(images)



def test_eva_models_are_claimed_with_their_own_weight_map():
    weights = {case: find_family(make(case)).weights for case in CASES}
    assert all(isinstance(find_family(make(case)), TimmEva) for case in CASES)
    assert [p.name for p in weights["eva02"].attn_in] == ["attn.qkv"]
    assert [p.name for p in weights["eva02-unfused"].attn_in] == ["attn.q_proj", "attn.k_proj", "attn.v_proj"]
    assert [p.name for p in weights["eva02-unfused"].mlp_in] == ["mlp.fc1_g", "mlp.fc1_x"]
    assert [p.name for p in weights["rope-vit"].mlp_in] == ["mlp.fc1"]
    assert find_family({"architecture": "vit_small_patch16_rope_224", "model_args": {}}).name == "timm-eva"


@pytest.mark.parametrize("case", list(CASES))
def test_keeping_every_layer_and_head_reproduces_the_source(case):
    model = make(case)
    heads = model.blocks[0].attn.num_heads
    assert torch.equal(run(reshape.leaner(model, heads=heads, depth=3), case), run(model, case))


@pytest.mark.parametrize("case", list(CASES))
def test_doubled_heads_two_thirds_depth_has_timms_count_and_copies_kept_layers(case):
    arch, args, _ = CASES[case]
    model = make(case)
    heads = model.blocks[0].attn.num_heads
    new = reshape.leaner(model, heads=2 * heads, depth=2)
    assert type(new) is type(model)
    assert new.blocks[0].attn.num_heads == 2 * heads and len(new.blocks) == 2
    assert run(new, case).shape == (2, 5)
    assert params(new) == params(timm.create_model(arch, pretrained=False, **{**args, "depth": 2,
                                                                           "num_heads": 2 * heads}))
    # Rotary tables are the new head dim's, built by timm, not the source's.
    fresh = timm.create_model(arch, pretrained=False, **{**args, "depth": 2, "num_heads": 2 * heads})
    for (name, buffer), (_, expected) in zip(new.rope.named_buffers(), fresh.rope.named_buffers()):
        assert torch.equal(buffer, expected), name
    # Keep-width heads are contiguous: the kept blocks (the first and last, uniform) are copied bit for bit.
    source = model.state_dict()
    for new_index, old_index in ((0, 0), (1, 2)):
        for key, tensor in new.blocks[new_index].state_dict().items():
            assert torch.equal(tensor, source[f"blocks.{old_index}.{key}"]), key
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "head.weight"):
        if key in source:
            assert torch.equal(new.state_dict()[key], source[key])


def test_depth_only_equals_the_kept_blocks_run_by_hand():
    model = make("rope-vit")
    new = reshape.leaner(model, heads=2, depth=2)
    cut = make("rope-vit")
    cut.blocks = nn.ModuleList([cut.blocks[0], cut.blocks[2]]) if isinstance(cut.blocks, nn.ModuleList) \
        else nn.Sequential(cut.blocks[0], cut.blocks[2])
    assert torch.equal(run(new, "rope-vit"), run(cut, "rope-vit"))


def test_mlp_slices_plain_and_swiglu_mlps_and_refuses_glumlp():
    for case in ("rope-vit", "eva02-unfused"):
        model = make(case)
        new = reshape.leaner(model, heads=model.blocks[0].attn.num_heads, depth=3, mlp=64)
        assert new.blocks[0].mlp.fc2.in_features == 64
        assert run(new, case).shape == (2, 5)
    with pytest.raises(ReshapeError, match="mlp=64: would slice a GluMlp"):
        reshape.leaner(make("eva02"), heads=3, depth=3, mlp=64)


def test_keep_head_dim_is_refused():
    with pytest.raises(ReshapeError):
        reshape.leaner(make("rope-vit"), heads=4, depth=2, keep_head_dim=True)


@pytest.mark.parametrize("case", ["eva02", "rope-vit"])
def test_converted_folder_reloads_with_plain_timm(case, tmp_path):
    model = make(case)
    family = find_family(model)
    family.save(model, family.spec(model), tmp_path / "src")
    heads = model.blocks[0].attn.num_heads
    recipe = reshape.convert(tmp_path / "src", tmp_path / "out", heads=2 * heads, depth=2)
    assert recipe["plan"]["heads"] == 2 * heads
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    expected = reshape.leaner(model, heads=2 * heads, depth=2)
    assert reloaded.blocks[0].attn.num_heads == 2 * heads and len(reloaded.blocks) == 2
    assert torch.equal(run(reloaded, case), run(expected, case))
