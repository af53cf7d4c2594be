"""timm XCiT (xcit_*): cross-covariance attention blocks, then class-attention blocks.

`--heads` and `--depth` act on the main blocks (`blocks`, XCA). The class-attention blocks
(`cls_attn_blocks`, two in every XCiT) are kept whole; timm builds them with the same `num_heads`, so
their q/k/v/proj weights are kept as they are and re-read as the new head count, like keep-width heads.
"""

from __future__ import annotations

from ..plan import Shape, target_shape
from .base import BlockWeights, Proj
from .timm_vit import TimmFamily


class TimmXCiT(TimmFamily):
    name = "timm-xcit"
    covers = "timm XCiT (xcit_*)"
    model_class = "timm.models.xcit:Xcit"
    embedding_names = ("patch_embed", "pos_embed", "cls_token")
    weights = BlockWeights(
        attn_in=(Proj("attn.qkv", ("q", "k", "v")),),
        attn_out=Proj("attn.proj"),
        mlp_in=(Proj("mlp.fc1"),),
        mlp_out=Proj("mlp.fc2"),
        # XCA normalises each query/key channel over the tokens and scales each head's channel-by-channel
        # logits by a learnt temperature. A new head's channels are a subset of its parent head's, so with
        # the parent's temperature every logit it keeps is exactly the parent's; only the softmax now runs
        # over fewer channels.
        per_head=("attn.temperature",),
    )
    # XCA computes its head dim as embed_dim / num_heads, so the attention width cannot differ from the model width.
    can_widen_attention = False
    # XCA attends across channels (a head_dim x head_dim map per head), not across tokens: the aware
    # split's token score form does not describe it.
    can_split_aware = False
    refuses = {"mlp": "would also resize the class-attention blocks' MLPs (timm sizes both by one mlp_ratio), "
                      "which reshape does not slice for XCiT"}

    def shape(self, config) -> Shape:
        model = self._skeleton(config)
        heads = model.blocks[0].attn.num_heads
        return Shape(layers=len(model.blocks), heads=heads, kv_heads=heads, head_dim=model.embed_dim // heads,
                     hidden=model.embed_dim, mlp=model.blocks[0].mlp.fc1.out_features)

    def new_config(self, config, shape, plan):
        new = target_shape(shape, plan)
        return self._new_args(config, depth=new.layers, num_heads=new.heads)


TIMM_XCIT = TimmXCiT()
