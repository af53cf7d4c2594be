"""timm Swin Transformer (swin_* v1, including swin_s3_*): four stages of shifted-window attention
blocks, each with its own width, heads and depth, joined by patch merging.

Heads and depth are given per stage (`--heads 6,12,24,48 --depth 2,2,4,2`; see reshape/stages.py).
Each window attention adds a learnt relative position bias per head: a new head takes its parent
head's column of the table. timm's SwinTransformer has one `head_dim` argument for every stage, so
`--keep-head-dim` applies where the stages share a head dim (as in every timm Swin).
"""

from __future__ import annotations

from ..errors import fail
from ..plan import Shape
from ..stages import StagedShape, result_shape
from .timm_vit import TimmStagedFamily, timm_block_weights


class TimmSwin(TimmStagedFamily):
    name = "timm-swin"
    covers = "timm Swin Transformer (swin_*, v1)"
    model_class = "timm.models.swin_transformer:SwinTransformer"
    embedding_names = ("patch_embed",)
    stages_attr = "layers"
    weights = timm_block_weights(per_head=("attn.relative_position_bias_table",),
                                 per_head_axis=1)  # the table is [(2 * window - 1) ** 2, heads]
    can_widen_attention = True  # through timm's head_dim argument
    # The aware split is fitted per block stack on one width; the stages differ in width.
    can_split_aware = False
    refuses = {"mlp": "would resize MLPs in stages of different widths, which timm sizes by one mlp_ratio"}

    def shape(self, config) -> StagedShape:
        model = self._skeleton(config)
        stages = []
        for stage in model.layers:
            attn = stage.blocks[0].attn
            width = attn.qkv.in_features
            stages.append(Shape(layers=len(stage.blocks), heads=attn.num_heads, kv_heads=attn.num_heads,
                                head_dim=attn.qkv.out_features // 3 // attn.num_heads, hidden=width,
                                mlp=stage.blocks[0].mlp.fc1.out_features))
        return StagedShape(tuple(stages))

    def finalize(self, model):
        """Recompute each block's shifted-window mask: a non-persistent buffer that timm derives from the
        block's weights' device, so a model built empty (on the meta device) holds it there."""
        for block in self.layers(model):
            block._init_buffers()

    def new_config(self, config, shape, plan):
        new = result_shape(shape, plan).stages
        head_dim = None  # timm then computes each stage's head dim as its width / heads
        if any(s.attn_width != s.hidden for s in new):
            dims = sorted({s.head_dim for s in new})
            if len(dims) > 1:
                raise fail("heads", ",".join(str(s.heads) for s in new), f"gives head dims {dims} with the "
                           "attention wider or narrower than the stage, and timm's Swin takes one head dim for "
                           "all stages", "keep the head dim equal in every stage, or drop --keep-head-dim")
            head_dim = dims[0]
        return self._new_args(config, depths=tuple(plan.depth), num_heads=tuple(plan.heads), head_dim=head_dim)


TIMM_SWIN = TimmSwin()
