"""timm Twins (twins_svt_*, twins_pcpvt_*): four stages, each with its own width, heads and depth, joined by
patch embeddings (`patch_embeds.<k>`, outside the blocks).

Heads and depth are given per stage (`--heads 4,8,16,32 --depth 2,2,4,2`; see reshape/stages.py); the model is
rebuilt by `timm.create_model(arch, depths=..., num_heads=...)`. A stage's blocks are `blocks.<k>.<i>` (a
ModuleList per stage). Keep-width only: timm's Twins has no head-dim argument, so every projection keeps its
shape and is copied bit for bit, read as more, narrower heads (the global attention's fused `attn.kv` holds
[k; v], each half re-read alike). There are no per-head tensors.

Two kinds of attention: Twins-PCPVT uses global sub-sampled attention (GlobalSubSampleAttn: attn.q, attn.kv,
attn.proj, and where the stage's sr_ratio > 1 the sub-sampling conv attn.sr and attn.norm) in every block.
Twins-SVT alternates by position: timm builds block i of stage k with `ws=1 if i % 2 == 1 else wss[k]`, so
even positions hold locally-grouped attention (LocallyGroupedAttn: attn.qkv, attn.proj, window wss[k]) and
odd positions global attention. A kept block must land on a position of its own kind (its weights name other
projections), so a plan whose kept blocks fall out of step is refused in one line. reshape has no hook for a
family to choose the kept blocks itself, and a staged plan takes no --keep: `--select first` always stays in
step, and so do the evenly spread depths the refusal names.

The first block of each stage stays first: timm applies the stage's positional convolution (PEG,
`pos_block.<k>`, outside the blocks) after block 0 of the stage, whichever block that is. Keeping another
block first would run and give the same shapes, but that block was trained on input that had been through the
PEG, and would now run before it: without the position information it was trained with, while the PEG would
read a block's output it never saw. `--select first` and the default even spread always keep block 0; a plan
that drops it (`--select last`) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from ..errors import Problem
from ..plan import Shape, select_layers
from ..stages import StagedShape
from .base import BlockWeights, Proj
from .timm_vit import TimmStagedFamily


@dataclass(frozen=True)
class TwinsShape(StagedShape):
    """A StagedShape with the attention kind of every block, per stage ("local" or "global")."""

    kinds: tuple[tuple[str, ...], ...] = ()


class TimmTwins(TimmStagedFamily):
    name = "timm-twins"
    covers = "timm Twins (twins_svt_*, twins_pcpvt_*)"
    model_class = "timm.models.twins:Twins"
    embedding_names = ("patch_embeds", "pos_block")  # the patch embeddings and the positional convolutions
    stages_attr = "blocks"  # model.blocks[k] is stage k's block stack itself (no .blocks below it)
    # The global sub-sampled attention's map (every PCPVT block, SVT's odd blocks); SVT's locally-grouped blocks
    # hold one fused attn.qkv instead. Keep-width contiguous heads and no MLP change read none of the input
    # projections: only attn.proj (common to both kinds) is read, by the conditioning measurement.
    weights = BlockWeights(attn_in=(Proj("attn.q", ("q",)), Proj("attn.kv", ("k", "v"))), attn_out=Proj("attn.proj"),
                           mlp_in=(Proj("mlp.fc1"),), mlp_out=Proj("mlp.fc2"))
    can_widen_attention = False  # Twins has no head-dim argument: the attention is as wide as its stage
    can_split_aware = False  # the aware split is fitted on one width; the stages differ in width
    refuses = {"mlp": "would give one MLP width to stages of different widths and MLP ratios"}

    def layers(self, model):
        return nn.ModuleList([block for stage in model.blocks for block in stage])

    def block_weights(self, block):
        from timm.models.twins import LocallyGroupedAttn

        if isinstance(block.attn, LocallyGroupedAttn):  # one fused qkv instead of q and kv
            return replace(self.weights, attn_in=(Proj("attn.qkv", ("q", "k", "v")),))
        return self.weights

    def stage_prefixes(self, model) -> list[str]:
        return [f"blocks.{k}." for k in range(len(model.blocks))]

    def shape(self, config) -> TwinsShape:
        from timm.models.twins import LocallyGroupedAttn

        model = self._skeleton(config)
        stages, kinds = [], []
        for stage in model.blocks:
            attn = stage[0].attn
            stages.append(Shape(layers=len(stage), heads=attn.num_heads, kv_heads=attn.num_heads,
                                head_dim=attn.dim // attn.num_heads, hidden=attn.dim,
                                mlp=stage[0].mlp.fc1.out_features))
            kinds.append(tuple("local" if isinstance(b.attn, LocallyGroupedAttn) else "global" for b in stage))
        return TwinsShape(tuple(stages), tuple(kinds))

    def align_plan(self, shape, plan):
        """Evenly spread, but in step: each new position j takes the source block of position j's kind
        nearest to where the even spread would put it, after the block before it (block 0 stays first)."""
        stages = []
        for kinds, stage in zip(shape.kinds, plan.stages):
            kept = list(stage.keep)
            if not _in_step(kinds, kept):
                kept = _aligned(kinds, kept)
            stages.append(replace(stage, keep=tuple(kept)))
        return replace(plan, stages=tuple(stages))

    def plan_problem(self, shape, plan):
        depth = ",".join(map(str, plan.depth))
        kinds = shape.kinds
        for k, (stage, kept) in enumerate(zip(shape.stages, plan.keep)):
            if kept[0] != 0:
                return Problem("depth", depth, f"drops block 0 of stage {k}, after which Twins applies the stage's "
                               f"positional convolution (pos_block.{k}), so block {kept[0]} would run first, without "
                               "the position information it was trained with",
                               "keep each stage's first block: use --select uniform or --select first")
        for k, (stage, kept) in enumerate(zip(shape.stages, plan.keep)):
            wrong = [(j, i) for j, i in enumerate(kept) if kinds[k][i] != kinds[k][j]]
            if wrong:
                j, i = wrong[0]
                fixed = [d if _in_step(kinds[s], select_layers(len(kinds[s]), d, "uniform"))
                         else max(e for e in range(1, d + 1)
                                  if _in_step(kinds[s], select_layers(len(kinds[s]), e, "uniform")))
                         for s, d in enumerate(plan.depth)]
                return Problem("depth", depth, f"keeps blocks {','.join(map(str, kept))} of stage {k}, which puts "
                               f"block {i} ({kinds[k][i]} attention) at position {j}, where Twins-SVT builds "
                               f"{kinds[k][j]} attention (it alternates local and global by position)",
                               f"use --select first, or --depth {','.join(map(str, fixed))} (spread evenly, in step)")
        return None

    def new_config(self, config, shape, plan):
        return self._new_args(config, depths=tuple(plan.depth), num_heads=tuple(plan.heads))


def _aligned(kinds: tuple[str, ...], spread: list[int]) -> list[int]:
    """For each new position j, the block of kind kinds[j] nearest spread[j] that leaves room for the
    positions after it; the even spread itself when no such choice exists (plan_problem then says so)."""
    kept, after = [], -1
    for j, target in enumerate(spread):
        room = len(spread) - j - 1  # blocks still to place after this one
        options = [i for i in range(after + 1, len(kinds) - room) if kinds[i] == kinds[j]
                   and _fits(kinds, i, j + 1, len(spread))]
        if not options:
            return spread
        after = min(options, key=lambda i: (abs(i - target), i))
        kept.append(after)
    return kept


def _fits(kinds: tuple[str, ...], last: int, position: int, depth: int) -> bool:
    """Can positions position..depth-1 still be filled, in step, from the blocks after `last`?"""
    for j in range(position, depth):
        last = next((i for i in range(last + 1, len(kinds)) if kinds[i] == kinds[j]), None)
        if last is None:
            return False
    return True


def _in_step(kinds: tuple[str, ...], kept) -> bool:
    """Does every kept block land on a position of its own attention kind?"""
    return all(kinds[i] == kinds[j] for j, i in enumerate(kept))


TIMM_TWINS = TimmTwins()
