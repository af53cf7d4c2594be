"""timm DaViT (davit_tiny … davit_giant): four stages, each a stack of dual blocks (a window-attention
block, then a channel-attention block), with its own width, heads and depth.

Heads and depth are given per stage (`--heads 6,12,24,48 --depth 1,1,5,1`; see reshape/stages.py).
Both attentions of a dual block take the stage's head count and keep their weights, re-read as the new
head count (keep-width, contiguous).
"""

from __future__ import annotations

from ..plan import Shape
from ..stages import StagedShape
from .timm_vit import TimmStagedFamily, timm_block_weights


class TimmDaViT(TimmStagedFamily):
    name = "timm-davit"
    covers = "timm DaViT (davit_*, except the *_fl variants)"
    model_class = "timm.models.davit:DaVit"
    embedding_names = ("stem",)
    stages_attr = "stages"
    # The window attention of each dual block (its first module; the channel block is "1.").
    weights = timm_block_weights("0.")
    # Window and channel attention compute their head dim as the stage width / num_heads.
    can_widen_attention = False
    # The channel block attends across channels, which the aware split's token score form does not describe.
    can_split_aware = False
    refuses = {"mlp": "would resize two MLPs per dual block in stages of different widths, which reshape "
                      "does not slice for DaViT"}

    def claims(self, obj) -> bool:
        # The *_fl variants name their dual blocks ("spatial_block", "channel_block"): another weight map.
        if not super().claims(obj):
            return False
        model = self._skeleton(obj) if isinstance(obj, dict) else obj
        return not hasattr(model.stages[0].blocks[0], "spatial_block")

    def shape(self, config) -> StagedShape:
        model = self._skeleton(config)
        stages = []
        for stage in model.stages:
            block = stage.blocks[0][0]
            heads = block.attn.num_heads
            stages.append(Shape(layers=len(stage.blocks), heads=heads, kv_heads=heads, head_dim=block.dim // heads,
                                hidden=block.dim, mlp=block.mlp.fc1.out_features))
        return StagedShape(tuple(stages))

    def new_config(self, config, shape, plan):
        return self._new_args(config, depths=tuple(plan.depth), num_heads=tuple(plan.heads))


TIMM_DAVIT = TimmDaViT()
