"""timm ConViT (convit_*): gated positional self-attention (GPSA) blocks, then plain (MHSA) blocks.

ConViT's first `local_up_to_layer` blocks use GPSA (`attn.qk` fused q/k, `attn.v`, `attn.proj`,
`attn.pos_proj` a Linear(3, heads) scoring relative positions, `attn.gating_param` one gate per head);
the rest use MHSA (`attn.qkv`, `attn.proj`). The class token is inserted just before the first MHSA block.

- Depth: every kept block keeps its kind, so the new `local_up_to_layer` is the number of kept GPSA
  blocks. A plan that keeps no MHSA block of a source that has some is refused: the class token would
  then never enter the model, and the classifier would read a patch token. Keeping no GPSA block is
  fine: the class token then enters before the first kept block, as it entered the MHSA blocks before.
- Heads (keep-width only): ConViT's `embed_dim` model arg is the head dim (timm multiplies it by
  `num_heads`), so the new config sets `embed_dim` = width / new heads; a head count must divide the
  width. The q/k/v/proj weights keep their shapes and are re-read as more, narrower heads (the contiguous
  split). Each new head takes its parent head's gate (`gating_param`) and its `pos_proj` row and bias,
  so its positional attention is its parent's.
- The weight map names only what both kinds share (`attn.proj`, `mlp.fc1`, `mlp.fc2`): `--mlp` keeps the
  strongest neurons of every block. The aware split (which rewrites query/key rows) is not used, since
  GPSA's q/k projection is not the map's; `--keep-head-dim` is refused (the attention width is always
  the model width in ConViT).
- `locality_strength` only shapes timm's initialisation of `pos_proj` (replaced by the transferred
  weights) and is kept. Each GPSA's `rel_indices` is a non-persistent buffer that timm recomputes
  whenever the token count changes; the rebuilt model has its own, computed on its first forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import Problem
from ..plan import Shape, target_shape
from .base import BlockWeights, Proj
from .timm_vit import TimmFamily, mlp_ratio

# Each new head takes its parent head's entries of these (heads on axis 0); MHSA blocks have none of them.
GPSA_PER_HEAD = ("attn.gating_param", "attn.pos_proj.weight", "attn.pos_proj.bias")


@dataclass(frozen=True)
class ConViTShape(Shape):
    """A ConViT's shape and how many of its blocks (the first ones) use GPSA, which `plan_problem` and
    `new_config` need. Written out (`to_dict`) as a plain Shape, like the result's shape."""

    gpsa_layers: int = 0

    def to_dict(self) -> dict:
        d = super().to_dict()
        del d["gpsa_layers"]
        return d


class TimmConViT(TimmFamily):
    name = "timm-convit"
    covers = "timm ConViT (convit_*)"
    model_class = "timm.models.convit:ConVit"
    embedding_names = ("patch_embed", "pos_embed", "cls_token")
    # What GPSA and MHSA blocks share. No attention inputs: GPSA's attn.qk/attn.v and MHSA's attn.qkv
    # differ, and nothing that needs them (aware split, keep-head-dim) applies here. So the report's
    # parameter breakdown counts only attn.proj as attention, and --relation distillation has no Q/K/V.
    weights = BlockWeights(attn_in=(), attn_out=Proj("attn.proj"), mlp_in=(Proj("mlp.fc1"),),
                           mlp_out=Proj("mlp.fc2"), per_head=GPSA_PER_HEAD)
    # ConViT's attention width is always its model width (embed_dim arg x num_heads).
    can_widen_attention = False
    can_split_aware = False

    def block_weights(self, block):
        if block.use_gpsa:  # GPSA: q and k fused, v apart (its positional projection is per head)
            attn_in = (Proj("attn.qk", ("q", "k")), Proj("attn.v", ("v",)))
        else:
            attn_in = (Proj("attn.qkv", ("q", "k", "v")),)
        return replace(self.weights, attn_in=attn_in)

    def shape(self, config) -> Shape:
        model = self._skeleton(config)
        heads = model.blocks[0].attn.num_heads
        return ConViTShape(layers=len(model.blocks), heads=heads, kv_heads=heads, head_dim=model.embed_dim // heads,
                           hidden=model.embed_dim, mlp=model.blocks[0].mlp.fc1.out_features,
                           gpsa_layers=sum(bool(block.use_gpsa) for block in model.blocks))

    def plan_problem(self, shape, plan):
        local = shape.gpsa_layers
        if local < shape.layers and all(i < local for i in plan.keep):
            return Problem("keep", ",".join(map(str, plan.keep)),
                           f"keeps none of the MHSA blocks {local}..{shape.layers - 1}, so the class token "
                           "(inserted before the first of them) would never enter the model",
                           f"keep at least one of layers {local}..{shape.layers - 1}")
        return None

    def new_config(self, config, shape, plan):
        new = target_shape(shape, plan)
        # embed_dim is the head dim: timm builds width embed_dim * num_heads.
        args = dict(depth=new.layers, num_heads=new.heads, embed_dim=shape.hidden // new.heads,
                    local_up_to_layer=sum(i < shape.gpsa_layers for i in plan.keep))
        if plan.mlp:
            args["mlp_ratio"] = mlp_ratio(shape.hidden, new.mlp)
        return self._new_args(config, **args)


TIMM_CONVIT = TimmConViT()
