"""timm XCiT (xcit_*): cross-covariance attention blocks, then class-attention blocks.

`--heads` and `--depth` act on the main blocks (`blocks`, XCA). The class-attention blocks
(`cls_attn_blocks`, two in every XCiT) are kept whole; timm builds them with the same `num_heads`, so
their q/k/v/proj weights are kept as they are and re-read as the new head count, like keep-width heads.

`--keep-head-dim` needs an attention wider than the model, which timm's XCA cannot build (its head
dim is width / heads). reshape then swaps each main block's XCA for `WideXCA` and records the head dim
as `attn_head_dim` in config.json; such a folder loads with `reshape.load`, not with plain timm.
"""

from __future__ import annotations

import contextlib
import functools

import torch.nn.functional as F
from torch import nn

from ..plan import Shape, target_shape
from .base import meta_parameters
from .timm_vit import TimmFamily, timm_block_weights

WIDE_KEY = "attn_head_dim"  # config.json key of a folder whose main blocks use WideXCA


@functools.cache  # one class, so isinstance checks hold; timm is imported on first use
def _wide_xca_class():
    from timm.models.xcit import XCA

    class WideXCA(XCA):
        """timm's XCA with its own head dim, so the attention width (heads x head dim) can differ from
        the model width. Parameter names and layout are XCA's."""

        def __init__(self, dim: int, num_heads: int, head_dim: int, qkv_bias: bool, attn_drop: float = 0.0,
                     proj_drop: float = 0.0):
            super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
            self.head_dim = head_dim
            self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
            self.proj = nn.Linear(num_heads * head_dim, dim)

        def forward(self, x):
            batch, tokens, _ = x.shape
            # (q/k/v, batch, heads, channels per head, tokens), as in XCA
            qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 4, 1)
            q, k, v = qkv.unbind(0)
            q = F.normalize(q, dim=-1) * self.temperature
            k = F.normalize(k, dim=-1)
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0,
                                               scale=1.0)
            x = x.permute(0, 3, 1, 2).reshape(batch, tokens, -1)
            return self.proj_drop(self.proj(x))

    return WideXCA


class TimmXCiT(TimmFamily):
    name = "timm-xcit"
    covers = "timm XCiT (xcit_*)"
    model_class = "timm.models.xcit:Xcit"
    embedding_names = ("patch_embed", "pos_embed", "cls_token")
    weights = timm_block_weights(
        # XCA normalises each query/key channel over the tokens and scales each head's channel-by-channel
        # logits by a learnt temperature. A new head's channels are a subset of its parent head's (or,
        # with the head dim kept, a copy of them), so with the parent's temperature every logit it keeps
        # is exactly the parent's.
        per_head=("attn.temperature",))
    # Through WideXCA (see the module docstring): such folders need reshape.load.
    can_widen_attention = True
    # XCA attends across channels (a head_dim x head_dim map per head), not across tokens: the aware
    # split's token score form does not describe it.
    can_split_aware = False
    refuses = {"mlp": "would also resize the class-attention blocks' MLPs (timm sizes both by one mlp_ratio), "
                      "which reshape does not slice for XCiT"}

    def spec(self, model):
        spec = super().spec(model)
        spec.config.update(self.extra_config(model))
        return spec

    def shape(self, config) -> Shape:
        model = self._skeleton(config)
        heads = model.blocks[0].attn.num_heads
        head_dim = config.get(WIDE_KEY) or model.embed_dim // heads
        return Shape(layers=len(model.blocks), heads=heads, kv_heads=heads, head_dim=head_dim,
                     hidden=model.embed_dim, mlp=model.blocks[0].mlp.fc1.out_features)

    def new_config(self, config, shape, plan):
        new = target_shape(shape, plan)
        config = self._new_args(config, depth=new.layers, num_heads=new.heads)
        config.pop(WIDE_KEY, None)
        if new.attn_width != new.hidden:
            config[WIDE_KEY] = new.head_dim
        return config

    def build(self, spec, empty):
        model = super().build(spec, empty)
        head_dim = spec.config.get(WIDE_KEY)
        if head_dim:
            wide = _wide_xca_class()
            for block in model.blocks:
                old = block.attn
                with meta_parameters() if empty else contextlib.nullcontext():
                    block.attn = wide(old.qkv.in_features, old.num_heads, head_dim, old.qkv.bias is not None,
                                      old.attn_drop.p, old.proj_drop.p)
        return model

    def extra_config(self, model) -> dict:
        attn = model.blocks[0].attn
        return {WIDE_KEY: attn.head_dim} if isinstance(attn, _wide_xca_class()) else {}

    def needs_reshape(self, config) -> str | None:
        if WIDE_KEY in config:
            return f"{WIDE_KEY} in config.json: an XCiT attention wider than timm builds, made by --keep-head-dim"
        return None

    def own_config(self, saved: dict) -> dict:
        return {WIDE_KEY: saved[WIDE_KEY]} if WIDE_KEY in saved else {}


TIMM_XCIT = TimmXCiT()
