"""timm Swin Transformer V2 (swinv2_*; not swinv2_cr_*, a different class left to torch.fx): four stages of
shifted-window cosine attention, each with its own width, heads and depth. Unlike v1, a stage's patch merging
(`layers.<i>.downsample`, stages 1-3) runs at its start; it sits outside the block stack, so it stays as it is.

Heads and depth are given per stage (`--heads 6,12,24,48 --depth 2,2,4,2`; see reshape/stages.py). Keep-width
only: the q/k/v and output projections, and the separate q/v biases (one entry per channel), stay bit for bit,
read as more, narrower heads. Each attention holds per-head tensors whose heads axis is 0: the cosine
attention's `logit_scale` [heads, 1, 1] and the last layer of the continuous position bias MLP
(`cpb_mlp.2.weight` [heads, 512], no bias); a new head takes its parent head's entries.

timm's SwinTransformerV2 fills its non-persistent buffers (relative coordinates, position index, k_bias, shift
masks) by copying into them at construction, which fails when parameters are on the meta device and buffers
are not: the skeleton is built with everything on the meta device, and `finalize` gives a rebuilt model its
own buffers, recomputed by timm.
"""

from __future__ import annotations

import functools
import json

import torch
from torch import nn

from .timm_swin import TimmSwin
from .timm_vit import timm_block_weights


@functools.lru_cache(maxsize=8)
def _skeleton(architecture: str, model_args: str) -> nn.Module:
    return _meta({"architecture": architecture, "model_args": json.loads(model_args)})


def _meta(config) -> nn.Module:
    with torch.device("meta"):  # buffers too: timm copies computed values into them at construction
        return TimmSwinV2._create(config)


class TimmSwinV2(TimmSwin):
    name = "timm-swinv2"
    covers = "timm Swin Transformer V2 (swinv2_*)"
    model_class = "timm.models.swin_transformer_v2:SwinTransformerV2"
    weights = timm_block_weights(per_head=("attn.logit_scale", "attn.cpb_mlp.2.weight"), per_head_axis=0)
    # SwinTransformerV2 has no head_dim argument: its attention is as wide as its stage.
    can_widen_attention = False
    can_split_aware = False  # cosine attention, and stages of different widths

    def _skeleton(self, config):
        return _skeleton(config["architecture"], json.dumps(config["model_args"], sort_keys=True, default=str))

    def build(self, spec, empty):
        if not empty:
            return super().build(spec, empty)
        with torch.device("meta"):  # see _meta; `finalize` gives the model its buffers once its weights are in
            return super().build(spec, empty=False)

    def finalize(self, model):
        """Replace the buffers left on the meta device (all non-persistent) by the model's own, computed by timm
        on its weights' device, floating ones in its weights' dtype."""
        weight = next(p for p in model.parameters() if p.is_floating_point())
        for module in model.modules():
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.is_meta:
                    dtype = weight.dtype if buf.is_floating_point() else buf.dtype
                    module._buffers[name] = torch.empty(buf.shape, dtype=dtype, device=weight.device)
        for module in model.modules():  # what timm's reinit_non_persistent_buffers does
            if hasattr(module, "init_non_persistent_buffers"):
                module.init_non_persistent_buffers()

    def new_config(self, config, shape, plan):
        return self._new_args(config, depths=tuple(plan.depth), num_heads=tuple(plan.heads))


TIMM_SWINV2 = TimmSwinV2()
