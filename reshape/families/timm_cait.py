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

How the rule is applied, with the hooks the pipeline calls (reshape/pipeline.py `rebuild`): the rows of
proj_l/proj_w (and their biases) follow each new head's parent through `per_head`; their columns
through `outside_per_head`, which names the new blocks' keys (the new depth is recorded by `build`,
which `rebuild` calls just before); `finalize` then applies the two scales. The family instance is
per model (`resolve`), and `build` resets what it recorded, so nothing carries from one rebuild to the next.
"""

from __future__ import annotations

from torch import nn

from ..errors import Problem
from ..plan import MIN_HEAD_DIM, Shape, target_shape
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

    def __init__(self):
        self._built: tuple[int, int] | None = None  # (depth, heads) of the model `build` last made
        self._split: int | None = None  # children per source head, once `outside_per_head` has named them

    def resolve(self, obj):
        return type(self)()  # one instance per model, for what build and outside_per_head record

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

    def build(self, spec, empty):
        model = super().build(spec, empty)
        self._built = (len(model.blocks), model.blocks[0].attn.num_heads)
        self._split = None
        return model

    def outside_per_head(self, model):
        """The columns of the new blocks' talking-heads weights follow their parent heads too. `rebuild`
        calls this (with the source) only when the head count changes, after building the new model."""
        if self._built is None:
            raise AssertionError("timm-cait: outside_per_head called before the new model was built")
        depth, heads = self._built
        self._split = heads // model.blocks[0].attn.num_heads
        return {f"blocks.{i}.{name}.weight": 1 for i in range(depth) for name in TALKING}

    def finalize(self, model):
        """Scale the talking-heads weights whose rows and columns were just copied from parent heads:
        proj_l by old_scale / new_scale (= 1 / sqrt(k)), proj_w by 1 / k."""
        k, self._split = self._split, None
        if not k or k == 1:
            return
        for block in model.blocks:
            attn = block.attn
            old_scale = (k * (attn.qkv.in_features // attn.num_heads)) ** -0.5  # as timm computes it
            for linear, factor in ((attn.proj_l, old_scale / attn.scale), (attn.proj_w, 1.0 / k)):
                weight = linear.weight
                linear.weight = nn.Parameter(weight.detach() * factor, requires_grad=weight.requires_grad)


TIMM_CAIT = TimmCaiT()
