"""timm Transformer in Transformer (tnt_*): each block runs an inner attention over the pixels of every
patch, then an outer attention over the patches.

`--heads` sets the outer heads, `--inner-heads` the inner ones; `--depth` and `--mlp` act on the blocks
and their outer MLP (timm fixes the inner MLP at 4x the inner width). The inner attention keeps its
weights and is re-read as the new head count (contiguous), the outer one follows `--head-split`.
"""

from __future__ import annotations

from ..plan import Shape, target_shape
from .base import BlockWeights, Proj
from .timm_vit import TimmFamily, mlp_ratio


class TimmTNT(TimmFamily):
    name = "timm-tnt"
    covers = "timm Transformer in Transformer (tnt_*)"
    model_class = "timm.models.tnt:TNT"
    embedding_names = ("pixel_embed", "norm1_proj", "proj", "norm2_proj", "cls_token", "patch_pos", "pixel_pos")
    weights = BlockWeights(
        attn_in=(Proj("attn_out.qk", ("q", "k")), Proj("attn_out.v", ("v",))),
        attn_out=Proj("attn_out.proj"),
        mlp_in=(Proj("mlp.fc1"),),
        mlp_out=Proj("mlp.fc2"),
    )
    # TNT's model args have no attention head dim: the width of q/k/v is the embedding width.
    can_widen_attention = False

    def shape(self, config) -> Shape:
        model = self._skeleton(config)
        attn = model.blocks[0].attn_out
        return Shape(layers=len(model.blocks), heads=attn.num_heads, kv_heads=attn.num_heads,
                     head_dim=attn.head_dim, hidden=model.embed_dim, mlp=model.blocks[0].mlp.fc1.out_features)

    def inner_shape(self, config) -> Shape:
        model = self._skeleton(config)
        attn, dim = model.blocks[0].attn_in, model.pixel_embed.in_dim
        return Shape(layers=len(model.blocks), heads=attn.num_heads, kv_heads=attn.num_heads,
                     head_dim=attn.head_dim, hidden=dim, mlp=model.blocks[0].mlp_in.fc1.out_features)

    def new_config(self, config, shape, plan):
        new = target_shape(shape, plan)
        args = dict(depth=new.layers, num_heads_outer=new.heads)
        if plan.inner_heads:
            args["num_heads_inner"] = plan.inner_heads
        if plan.mlp:
            args["mlp_ratio"] = mlp_ratio(shape.hidden, new.mlp)
        return self._new_args(config, **args)


TIMM_TNT = TimmTNT()
