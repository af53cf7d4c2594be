"""The torch.fx path: modules no adapter claims, rewritten as graphs (reshape/fx/).

Covered: torch.nn.TransformerEncoder (nn.MultiheadAttention), a nanoGPT-style GPT and a hand-written
ViT (tests/helpers/fx_models.py), and timm's PiT and ViT-RelPos (a learned per-head bias: each new head adds
its parent's), which no adapter claims. For each: a no-op
rewrite reproduces the eager outputs, a depth-only rewrite equals the eager model running only the
kept blocks, and doubled heads equal the same attention class built with twice the heads and given
the same weights. With keep_head_dim the projections grow instead (Net2Net), so the rewritten model
computes what the source (or its kept blocks) did.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Callable

import pytest
import timm
import torch
from safetensors.torch import load_model
from torch import nn

from helpers import fx_models as M
from helpers.cli_in_process import invoke

import reshape
from reshape.errors import ReshapeError
from reshape.fx.rewrite import params


@dataclass
class Case:
    id: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], torch.Tensor]
    stack: Callable[[nn.Module], nn.Module]  # the block container
    heads: int | None  # the source's heads, None where re-heading is refused
    doubled: Callable[[nn.Module], nn.Module] | None = None  # an independent model with twice the heads

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return self.build().eval()


def _rebuilt(build, **kw):
    """The same class built with other numbers and given the source's weights."""
    def make(model):
        other = build(**kw)
        other.load_state_dict(model.state_dict())
        return other.eval()
    return make


def _timm_doubled(model):
    """Every attention of PiT's longest stage rebuilt by its own class with twice the heads."""
    model = copy.deepcopy(model)
    for block in model.transformers[1].blocks:
        attn = block.attn
        new = type(attn)(attn.qkv.in_features, num_heads=2 * attn.num_heads, qkv_bias=True)
        new.load_state_dict(attn.state_dict())
        block.attn = new.eval()
    return model


def _loud(model):
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.2)
        if hasattr(module, "gamma"):
            nn.init.ones_(module.gamma)
    return model


def _relpos_doubled(model):
    """timm's ViT-RelPos built with twice the heads: the relative-position MLP's last layer gets one output per
    new head, its parent head's (rows repeated), the rest of the weights unchanged."""
    other = timm.create_model("test_vit_relpos", img_size=64, num_classes=0,
                              num_heads=2 * model.blocks[0].attn.num_heads)
    state = {k: v.repeat_interleave(2, 0) if "rel_pos.mlp.fc2" in k else v for k, v in model.state_dict().items()}
    other.load_state_dict(state)
    return other.eval()


def _ids():
    return torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))


def _image(size):
    return lambda: torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))


CASES = [
    Case("transformer-encoder", M.encoder, _ids, lambda m: m.encoder.layers, 2, _rebuilt(M.encoder, heads=4)),
    Case("nanogpt", M.gpt, _ids, lambda m: m.h, 2, _rebuilt(M.gpt, n_head=4)),
    Case("vit", M.vit, _image(16), lambda m: m.blocks, 2, _rebuilt(M.vit, heads=4)),
    Case("timm-pit", lambda: timm.create_model("pit_ti_224", img_size=64), _image(64),
         lambda m: m.transformers[1].blocks, 4, _timm_doubled),
    # Without a classifier (timm starts it at zero), with larger weights than timm's std 0.02 and layer scales
    # of 1, not 1e-5: else the attention is too quiet against the residual stream for a change of heads to show.
    Case("timm-relpos", lambda: _loud(timm.create_model("test_vit_relpos", img_size=64, num_classes=0)), _image(64),
         lambda m: m.blocks, 3, _relpos_doubled),
]


def close(a, b, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


def _kept_by_hand(case, model, keep):
    """The eager model running the kept blocks only."""
    by_hand = copy.deepcopy(model)
    stack = case.stack(by_hand)
    kept = [stack[i] for i in keep]
    for name in [n for n, _ in stack.named_children()]:
        delattr(stack, name)
    for i, block in enumerate(kept):
        stack.add_module(str(i), block)
    return by_hand


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@torch.no_grad()
def test_noop_and_depth_only(case):
    model, x = case.model(), case.inputs()
    expected = model(x)
    same = reshape.leaner(model)
    close(same(x), expected)
    assert params(same) == params(model)

    blocks = case.stack(model)
    keep = [0, len(blocks) - 1]
    shorter = reshape.leaner(model, depth=2)
    assert shorter.meta["reshape"]["plan"]["keep"] == keep
    by_hand = _kept_by_hand(case, model, keep)
    close(shorter(x), by_hand(x))
    dropped = sum(p.numel() for i, b in enumerate(blocks) if i not in keep for p in b.parameters())
    assert params(shorter)["total"] == params(model)["total"] - dropped
    assert sorted(shorter.state_dict()) == sorted(by_hand.state_dict())  # kept blocks renumbered 0..L-1
    close(model(x), expected)  # the source is untouched


@pytest.mark.parametrize("case", [c for c in CASES if c.doubled], ids=lambda c: c.id)
@torch.no_grad()
def test_doubled_heads_match_the_class_built_with_them(case):
    model, x = case.model(), case.inputs()
    new = reshape.leaner(model, heads=2 * case.heads)
    expected = case.doubled(model)(x)
    close(new(x), expected, atol=1e-5)  # float rounding of outputs up to ~10 (the ViT-RelPos case's weights)
    assert not torch.allclose(new(x), model(x), atol=1e-4)  # the heads really changed
    assert params(new) == params(model)  # keep-width: every weight keeps its shape


@torch.no_grad()
def test_heads_and_depth_together_and_exact_parameter_counts():
    model, x = CASES[1].model(), _ids()
    new = reshape.leaner(model, heads=4, keep=[1, 2])
    independent = M.GPT(n_head=4, n_layer=2).eval()
    independent.load_state_dict(new.state_dict())  # renumbered keys load into the class built at depth 2
    close(new(x), independent(x))
    # GPT: 50x32 wte + 16x32 wpe + 32+32 ln_f; each block 12,704 (two norms, c_attn, c_proj, MLP); lm_head tied.
    assert params(model) == {"total": 52_992, "embeddings": 2_112, "non_embedding": 50_880}
    assert params(new) == {"total": 27_584, "embeddings": 2_112, "non_embedding": 25_472}
    # The result owns its tensors (training it leaves the source alone), and the tie is kept.
    assert not {id(p) for p in new.parameters()} & {id(p) for p in model.parameters()}
    assert new.lm_head.weight is new.wte.weight


@torch.no_grad()
def test_softmax_scale_follows_the_new_head_dim():
    model = CASES[2].model()
    new = reshape.leaner(model, heads=4)
    code = new.blocks.get_submodule("0").code
    assert "0.35355339" in code and "0.25" not in code  # 1/sqrt(8), not the source's 1/sqrt(16)
    assert "reshape(getitem, getitem_1, 3, 4, 8)" in code  # (B, N, qkv, heads, head dim)


@torch.no_grad()
def test_saved_folder_loads_back(tmp_path):
    recipe = reshape.convert("helpers.fx_models:gpt", tmp_path / "gpt", heads=4, depth=3, trust_remote_code=True)
    assert recipe["path"] == "fx" and recipe["plan"]["keep"] == [0, 2, 3]
    assert recipe["shape"]["heads"] == 4 and recipe["shape"]["head_dim"] == 8
    assert sorted(os.listdir(tmp_path / "gpt")) == ["code.py", "model.safetensors", "reshape.json"]
    assert "scaled_dot_product_attention" in (tmp_path / "gpt" / "code.py").read_text()
    loaded = reshape.load(tmp_path / "gpt", trust_remote_code=True)
    assert loaded.lm_head.weight is loaded.wte.weight  # still tied
    independent = M.GPT(n_head=4, n_layer=3).eval()  # the class built with the new numbers, same weights
    load_model(independent, tmp_path / "gpt" / "model.safetensors")
    close(loaded(_ids()), independent(_ids()))
    with pytest.raises(ReshapeError, match=r"^model=helpers\.fx_models:gpt: is a factory.*--trust-remote-code"):
        reshape.load(tmp_path / "gpt")


@torch.no_grad()
def test_timm_name_without_adapter_converts_and_loads(tmp_path):
    recipe = reshape.convert("test_vit_relpos", tmp_path / "relpos", depth=6)
    assert recipe["build"] == {"timm": "test_vit_relpos", "model_args": {}}
    assert recipe["plan"]["keep"] == [0, 2, 3, 5, 6, 8]
    loaded = reshape.load(tmp_path / "relpos")
    x = _image(160)()
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "relpos" / "model.safetensors")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in weights.items())
    assert len(loaded.blocks._modules) == 6
    assert loaded(x).shape == (2, 1000)


# --- keep-head-dim: more heads of the same head dim, the projections grow ---------------------------------

# Per case: where the blocks are, and the fused Q/K/V and output Linears in a block.
WIDENED = {"nanogpt": ("h", "attn.c_attn", "attn.c_proj"), "vit": ("blocks", "attn.qkv", "attn.proj")}


def _attention_params(dim, width):
    """A fused Q/K/V Linear (3 * width outputs) and the output Linear, with biases."""
    return (dim * 3 * width + 3 * width) + (width * dim + dim)


@pytest.mark.parametrize("heads", [4, 3], ids=["doubled", "not-a-multiple"])
@pytest.mark.parametrize("case_id", list(WIDENED))
@torch.no_grad()
def test_keep_head_dim_preserves_the_function(case_id, heads):
    case = next(c for c in CASES if c.id == case_id)
    model, x = case.model(), case.inputs()
    new = reshape.leaner(model, heads=heads, keep_head_dim=True)
    close(new(x), model(x), atol=1e-5)
    width = 16 * heads  # head dim 16 (32 wide, 2 heads) is kept
    stack, fused, out = WIDENED[case_id]
    for i in range(4):
        block = new.get_submodule(f"{stack}.{i}")
        assert block.get_submodule(fused).weight.shape == (3 * width, 32)
        assert block.get_submodule(fused).bias.shape == (3 * width,)
        assert block.get_submodule(out).weight.shape == (32, width)
        assert block.get_submodule(out).bias.shape == (32,)
    grown = 4 * (_attention_params(32, width) - _attention_params(32, 32))
    assert params(new)["total"] == params(model)["total"] + grown
    assert params(new)["embeddings"] == params(model)["embeddings"]

    shorter = reshape.leaner(model, heads=heads, depth=2, keep_head_dim=True)
    close(shorter(x), _kept_by_hand(case, model, [0, 3])(x), atol=1e-5)
    close(model(x), case.model()(x))  # the source is untouched


@pytest.mark.parametrize("heads", [8, 6])
@torch.no_grad()
def test_keep_head_dim_with_grouped_kv_widens_the_queries_only(heads):
    torch.manual_seed(0)
    model, x = M.Grouped().eval(), torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    new = reshape.leaner(model, heads=heads, keep_head_dim=True)
    close(new(x), model(x), atol=1e-5)
    width = 8 * heads  # 4 heads of 8, 2 KV heads
    shapes = {n: tuple(new.get_submodule(f"blocks.0.attn.{n}").weight.shape) for n in "qkvo"}
    assert shapes == {"q": (width, 32), "k": (16, 32), "v": (16, 32), "o": (32, width)}
    # Three blocks: q gains (width - 32) rows of 32 weights and a bias each, o as many columns of 32.
    assert params(new)["total"] == params(model)["total"] + 3 * (width - 32) * (33 + 32)
    with pytest.raises(ReshapeError) as e:
        reshape.leaner(model, heads=5, keep_head_dim=True)
    _one_line(e, "heads=5: is not a multiple of the 2 KV heads")


@torch.no_grad()
def test_keep_width_with_grouped_kv_scales_the_kv_heads_too():
    """As for the adapters: 4 heads / 2 KV heads -> 8 / 4 at the same width, the same weights re-read,
    equal to the class built with 8 / 4 heads."""
    torch.manual_seed(0)
    model, x = M.Grouped(dim=64).eval(), torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    new = reshape.leaner(model, heads=8)
    independent = M.Grouped(dim=64, heads=8, kv_heads=4).eval()
    independent.load_state_dict(model.state_dict())
    close(new(x), independent(x))
    assert not torch.allclose(new(x), model(x), atol=1e-3)


@torch.no_grad()
def test_keep_head_dim_saved_folder_loads_back(tmp_path):
    recipe = reshape.convert("helpers.fx_models:gpt_seeded", tmp_path / "gpt", heads=4, depth=3, keep_head_dim=True,
                             trust_remote_code=True)
    assert recipe == json.loads((tmp_path / "gpt" / "reshape.json").read_text())
    assert recipe["plan"]["head_mode"] == "keep-head-dim" and recipe["plan"]["keep"] == [0, 2, 3]
    assert recipe["shape"] == {"layers": 3, "heads": 4, "kv_heads": 4, "head_dim": 16, "hidden": 64, "mlp": 0}
    source = M.gpt_seeded().eval()
    # One 12,704-parameter block dropped (see above); three kept, each with a twice as wide attention.
    assert recipe["params"]["source"] == params(source)
    assert recipe["params"]["result"]["total"] == (params(source)["total"] - 12_704
                                                   + 3 * (_attention_params(32, 64) - _attention_params(32, 32)))
    loaded = reshape.load(tmp_path / "gpt", trust_remote_code=True)
    assert loaded.get_submodule("h.0.attn.c_attn").weight.shape == (192, 32)
    close(loaded(_ids()), _kept_by_hand(CASES[1], source, [0, 2, 3])(_ids()), atol=1e-5)


def test_keep_head_dim_refusals_write_nothing(tmp_path):
    with pytest.raises(ReshapeError) as e:
        reshape.convert("helpers.fx_models:encoder", tmp_path / "out", heads=4, keep_head_dim=True, trust_remote_code=True)
    assert _one_line(e, "keep_head_dim=True: cannot widen block encoder.layers.0: its attention is an "
                        "nn.MultiheadAttention").endswith("; drop --keep-head-dim to keep the width")
    assert list(tmp_path.iterdir()) == []


@torch.no_grad()
def test_keep_head_dim_needs_an_output_projection():
    model = CASES[1].model()
    for block in model.h:
        block.attn.c_proj = nn.Identity()  # the merged heads go straight into the residual
    with pytest.raises(ReshapeError) as e:
        reshape.leaner(model, heads=4, keep_head_dim=True)
    _one_line(e, "keep_head_dim=True: cannot widen block h.0: its attention reads the merged heads from add, "
                 "which is not an nn.Linear call")
    reshape.leaner(model, heads=4)(_ids())  # keep-width needs no projection


# --- bad input: one line each, nothing written ------------------------------------------------------

class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Branchy() for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = M.CausalSelfAttention(16, 2)
        self.gate = Gate()

    def forward(self, x):
        return x + self.gate(self.attn(x))


class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # data-dependent control flow


class NoStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(self.a(x))


def _one_line(excinfo, start):
    text = str(excinfo.value)
    assert "\n" not in text and text.startswith(start), text
    return text


def test_untraceable_block_names_the_module_and_the_leaf_fix():
    with pytest.raises(ReshapeError) as e:
        reshape.leaner(Untraceable(), heads=4)
    text = _one_line(e, "model=blocks.0.gate: cannot be traced by torch.fx in Gate.forward")
    assert "leaf_modules=[Gate]" in text
    # Depth alone never traces inside a block, and a marked leaf keeps the rewrite going.
    assert len(reshape.leaner(Untraceable(), depth=2).blocks._modules) == 2
    new = reshape.leaner(Untraceable(), heads=4, leaf_modules=[Gate], force=True)
    assert isinstance(new.blocks.get_submodule("0"), torch.fx.GraphModule)


def test_no_repeated_block_stack():
    with pytest.raises(ReshapeError) as e:
        reshape.leaner(NoStack(), depth=1)
    text = _one_line(e, "model=NoStack: is not a supported model family, and the torch.fx path found no repeated "
                        "block stack on its main path")
    assert "nn.ModuleList" in text and "timm VisionTransformer" in text  # both fixes: blocks, or an adapter


@pytest.mark.parametrize("case_id, kwargs, start, fragment", [
    ("nanogpt", {"heads": 3}, "heads=3: does not divide the attention width 32", "use one of"),
    ("timm-relpos", {"heads": 4}, "heads=4: cannot be set: in block blocks.0", "a new head count must be a "
     "multiple of 3 so each new head has one parent head"),
    ("transformer-encoder", {"heads": 4, "keep_head_dim": True}, "keep_head_dim=True: cannot widen block "
     "encoder.layers.0: its attention is an nn.MultiheadAttention (self_attn), which cannot hold a head dim",
     "; drop --keep-head-dim to keep the width"),
    ("vit", {"depth": 9}, "depth=9: must be between 1 and the model's 4 layers", "use a depth"),
])
def test_head_counts_the_attention_cannot_take(case_id, kwargs, start, fragment):
    case = next(c for c in CASES if c.id == case_id)
    with pytest.raises(ReshapeError) as e:
        reshape.leaner(case.model(), **kwargs)
    assert fragment in _one_line(e, start)


def test_refusals_write_nothing(tmp_path):
    for source, kwargs in [("helpers.fx_models:gpt", {"heads": 3, "trust_remote_code": True}),
                           ("helpers.fx_models:gpt", {})]:
        with pytest.raises(ReshapeError):
            reshape.convert(source, tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


# --- the command ---------------------------------------------------------------------------------------

def _cli(*args):
    """`reshape ARGS` in this process, where helpers.fx_models imports (tests/ is on pytest's pythonpath)."""
    run = invoke(*args)
    assert run.returncode == 0, run.stderr
    return run


def test_cli_reaches_the_fx_path(tmp_path):
    run = _cli("convert", "helpers.fx_models:vit", "--heads", "4", "--depth", "3", "-o", str(tmp_path / "vit"),
               "--trust-remote-code", "--json")
    recipe = json.loads(run.stdout)
    assert recipe["path"] == "fx" and recipe["plan"]["keep"] == [0, 2, 3]
    assert recipe["params"]["result"]["total"] < recipe["params"]["source"]["total"]
    loaded = reshape.load(tmp_path / "vit", trust_remote_code=True)
    independent = M.ViT(heads=4, depth=3).eval()
    load_model(independent, tmp_path / "vit" / "model.safetensors")
    with torch.no_grad():
        close(loaded(_image(16)()), independent(_image(16)()))


def test_cli_keep_head_dim(tmp_path):
    run = _cli("convert", "helpers.fx_models:vit_seeded", "--heads", "4", "--depth", "3", "--keep-head-dim",
               "-o", str(tmp_path / "vit"), "--trust-remote-code", "--json")
    recipe = json.loads(run.stdout)
    assert recipe["plan"]["head_mode"] == "keep-head-dim" and recipe["plan"]["keep"] == [0, 2, 3]
    assert recipe["shape"]["heads"] == 4 and recipe["shape"]["head_dim"] == 16 and recipe["shape"]["hidden"] == 64
    loaded = reshape.load(tmp_path / "vit", trust_remote_code=True)
    assert loaded.get_submodule("blocks.0.attn.proj").weight.shape == (32, 64)
    source = M.vit_seeded().eval()
    with torch.no_grad():
        close(loaded(_image(16)()), _kept_by_hand(CASES[2], source, [0, 2, 3])(_image(16)()), atol=1e-5)
