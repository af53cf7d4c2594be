"""timm CaiT (cait_*): talking-heads self-attention blocks, then class-attention blocks.

`--heads` and `--depth` act on the main blocks (`blocks`). The class-attention blocks
(`blocks_token_only`, two in every CaiT) are kept whole; timm builds them with the same `num_heads`, so
their q/k/v/proj weights keep their shapes and are re-read as the new head count (contiguous, like
keep-width heads). Every block's layer scales (`gamma_1`, `gamma_2`) are kept as they are.

The main blocks' talking-heads attention mixes the attention logits across heads before the softmax
(`attn.proj_l`, a Linear(heads, heads) on the heads axis) and the attention weights after it
(`attn.proj_w`). Splitting every head contiguously into k = new / old children, the split is exact:

- a parent head's logit (scaled by old_scale = old_head_dim ** -0.5) is the sum of its children's
  partial logits (each scaled by new_scale), times old_scale / new_scale. So with
  proj_l'[c, i] = proj_l[p(c), p(i)] * old_scale / new_scale and proj_l.bias'[c] = proj_l.bias[p(c)],
  every child c of parent p(c) gets its parent's mixed logits, hence its parent's softmax;
- the children of a head all hold their parent's softmax, so with proj_w'[c, i] = proj_w[p(c), p(i)] / k
  and proj_w.bias'[c] = proj_w.bias[p(c)] every child gets its parent's mixed attention;
- each child then reads its own slice of its parent's values: the concatenated heads are the parent's.

The rule needs every new head to have exactly one parent and every parent the same number of children,
so the new head count must be a multiple of the source's; others are refused. The aware split (which
rewrites query/key rows per head) is not used: the contiguous split above is already exact.

How the rule is applied: the rows of proj_l/proj_w (and their biases) follow each new head's parent
through `per_head`, as every per-head tensor does; `adjust_block` then picks their columns the same way
and applies the two scales.
"""

from __future__ import annotations

import torch

from ..errors import Problem
from ..plan import MIN_HEAD_DIM, Shape, target_shape
from ..plan import parent_heads
from .timm_vit import TimmFamily, mlp_ratio, timm_block_weights

TALKING = ("attn.proj_l", "attn.proj_w")


class TimmCaiT(TimmFamily):
    name = "timm-cait"
    covers = "timm CaiT (cait_*)"
    model_class = "timm.models.cait:Cait"
    embedding_names = ("patch_embed", "pos_embed", "cls_token")
    # Each new head takes its parent's rows of the talking-heads mixers (their columns: outside_per_head).
    weights = timm_block_weights(per_head=tuple(f"{name}.{p}" for name in TALKING for p in ("weight", "bias")))
    # TalkingHeadAttn's head dim is always width / heads: a saved config cannot widen the attention.
    can_widen_attention = False
    # The contiguous split with the talking-heads rule is exact; the aware split's rewritten query/key
    # rows would break the sums it relies on.
    can_split_aware = False

    def shape(self, config) -> Shape:
        model = self._skeleton(config)
        attn = model.blocks[0].attn
        return Shape(layers=len(model.blocks), heads=attn.num_heads, kv_heads=attn.num_heads,
                     head_dim=model.embed_dim // attn.num_heads, hidden=model.embed_dim,
                     mlp=model.blocks[0].mlp.fc1.out_features)

    def plan_problem(self, shape, plan):
        if plan.heads != shape.heads and plan.heads % shape.heads:
            legal = [h for h in range(2 * shape.heads, shape.attn_width // MIN_HEAD_DIM + 1, shape.heads)
                     if shape.attn_width % h == 0]
            return Problem("heads", plan.heads, f"is not a multiple of the model's {shape.heads} heads, which the "
                           "talking-heads mixers (proj_l, proj_w) need to split each head into equal children",
                           f"use one of {', '.join(map(str, legal))}" if legal else f"keep {shape.heads} heads")
        return None

    def new_config(self, config, shape, plan):
        new = target_shape(shape, plan)
        args = dict(depth=new.layers, num_heads=new.heads)
        if plan.mlp:  # the main blocks' MLPs only: the class-attention blocks have mlp_ratio_token_only
            args["mlp_ratio"] = mlp_ratio(shape.hidden, new.mlp)
        return self._new_args(config, **args)

    def adjust_block(self, layer, shape, plan):
        if plan.heads == shape.heads:
            return layer
        k = plan.heads // shape.heads
        parents = torch.tensor(parent_heads(shape, plan))
        # proj_l mixes logits scaled by old_scale = head_dim ** -0.5; each child's logits carry new_scale.
        for name, factor in (("attn.proj_l.weight", k ** -0.5), ("attn.proj_w.weight", 1.0 / k)):
            layer[name] = layer[name].index_select(1, parents) * factor
        return layer


TIMM_CAIT = TimmCaiT()
