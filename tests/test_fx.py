"""The torch.fx path: modules no adapter claims, rewritten as graphs (reshape/fx/).

Covered: torch.nn.TransformerEncoder (nn.MultiheadAttention), a nanoGPT-style GPT and a hand-written
ViT (tests/fx_models.py), and timm's PiT and ViT-RelPos, which no adapter claims. For each: a no-op
rewrite reproduces the eager outputs, a depth-only rewrite equals the eager model running only the
kept blocks, and doubled heads equal the same attention class built with twice the heads and given
the same weights.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import timm
import torch
from safetensors.torch import load_model
from torch import nn

import reshape
from reshape.errors import ReshapeError
from reshape.fx.rewrite import params

sys.path.insert(0, str(Path(__file__).parent))
import fx_models as M  # noqa: E402

TESTS = Path(__file__).parent


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
    Case("timm-relpos", lambda: timm.create_model("test_vit_relpos", img_size=64), _image(64), lambda m: m.blocks,
         None),
]


def close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


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
    by_hand = copy.deepcopy(model)  # the eager model running the kept blocks only
    stack = case.stack(by_hand)
    kept = [stack[i] for i in keep]
    for name in [n for n, _ in stack.named_children()]:
        delattr(stack, name)
    for i, block in enumerate(kept):
        stack.add_module(str(i), block)
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
    close(new(x), expected)
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


@torch.no_grad()
def test_softmax_scale_follows_the_new_head_dim():
    model = CASES[2].model()
    new = reshape.leaner(model, heads=4)
    code = new.blocks.get_submodule("0").code
    assert "0.35355339" in code and "0.25" not in code  # 1/sqrt(8), not the source's 1/sqrt(16)
    assert "reshape(getitem, getitem_1, 3, 4, 8)" in code  # (B, N, qkv, heads, head dim)


@torch.no_grad()
def test_saved_folder_loads_back(tmp_path):
    recipe = reshape.convert("fx_models:gpt", tmp_path / "gpt", heads=4, depth=3, trust_remote_code=True)
    assert recipe["path"] == "fx" and recipe["plan"]["keep"] == [0, 2, 3]
    assert recipe["shape"]["heads"] == 4 and recipe["shape"]["head_dim"] == 8
    assert sorted(os.listdir(tmp_path / "gpt")) == ["code.py", "model.safetensors", "reshape.json"]
    assert "scaled_dot_product_attention" in (tmp_path / "gpt" / "code.py").read_text()
    loaded = reshape.load(tmp_path / "gpt", trust_remote_code=True)
    assert loaded.lm_head.weight is loaded.wte.weight  # still tied
    independent = M.GPT(n_head=4, n_layer=3).eval()  # the class built with the new numbers, same weights
    load_model(independent, tmp_path / "gpt" / "model.safetensors")
    close(loaded(_ids()), independent(_ids()))
    with pytest.raises(ReshapeError, match=r"^model=fx_models:gpt: is a factory.*--trust-remote-code"):
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
    ("timm-relpos", {"heads": 6}, "heads=6: cannot be set: in block blocks.0", "learned attention bias"),
    ("transformer-encoder", {"heads": 4, "keep_head_dim": True}, "keep_head_dim=True: is not available",
     "drop --keep-head-dim"),
    ("vit", {"depth": 9}, "depth=9: must be between 1 and the model's 4 layers", "use a depth"),
])
def test_head_counts_the_attention_cannot_take(case_id, kwargs, start, fragment):
    case = next(c for c in CASES if c.id == case_id)
    with pytest.raises(ReshapeError) as e:
        reshape.leaner(case.model(), **kwargs)
    assert fragment in _one_line(e, start)


def test_refusals_write_nothing(tmp_path):
    for source, kwargs in [("fx_models:gpt", {"heads": 3, "trust_remote_code": True}), ("fx_models:gpt", {})]:
        with pytest.raises(ReshapeError):
            reshape.convert(source, tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


# --- the command ---------------------------------------------------------------------------------------

def test_cli_reaches_the_fx_path(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "1000", "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([sys.executable, "-m", "reshape.cli", "convert", "fx_models:vit", "--heads", "4",
                          "--depth", "3", "-o", str(tmp_path / "vit"), "--trust-remote-code", "--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    recipe = json.loads(run.stdout)
    assert recipe["path"] == "fx" and recipe["plan"]["keep"] == [0, 2, 3]
    assert recipe["params"]["result"]["total"] < recipe["params"]["source"]["total"]
    loaded = reshape.load(tmp_path / "vit", trust_remote_code=True)
    independent = M.ViT(heads=4, depth=3).eval()
    load_model(independent, tmp_path / "vit" / "model.safetensors")
    with torch.no_grad():
        close(loaded(_image(16)()), independent(_image(16)()))
