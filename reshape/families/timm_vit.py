"""timm VisionTransformer family (vit_*, deit_*), rebuilt through `timm.create_model`.

timm is imported on first use: it costs seconds of start-up that users of other families should not pay.
"""

from __future__ import annotations

import copy
from pathlib import Path

from accelerate import init_empty_weights
from torch import nn

from ..errors import fail
from ..plan import Shape, target_shape
from .base import BlockWeights, Family, ModelSpec, Proj


class TimmViT(Family):
    name = "timm-vit"
    covers = "timm VisionTransformer (vit_*, deit_*)"
    library = "timm"
    weights = BlockWeights(
        attn_in=(Proj("attn.qkv", ("q", "k", "v")),),
        attn_out=Proj("attn.proj"),
        mlp_in=(Proj("mlp.fc1"),),
        mlp_out=Proj("mlp.fc2"),
    )
    # VisionTransformer's model args have no attention head dim, so a saved config could not rebuild it.
    can_widen_attention = False

    def claims(self, obj) -> bool:
        if isinstance(obj, nn.Module) and not type(obj).__module__.startswith("timm."):
            return False
        if not isinstance(obj, (nn.Module, dict)):
            return False
        import timm
        from timm.models.vision_transformer import VisionTransformer

        if isinstance(obj, dict) and timm.is_model(obj.get("architecture", "")):
            obj = self._skeleton(obj)
        return isinstance(obj, VisionTransformer)

    def spec(self, model):
        from timm.models import get_model_args

        arch = getattr(model, "pretrained_cfg", {}).get("architecture")
        if not arch or not hasattr(model, "_model_args"):
            raise fail("model", type(model).__name__, "was not built by timm.create_model, so its architecture is unknown",
                       "create it with timm.create_model(name, ...)")
        config = {"architecture": arch, "model_args": get_model_args(model),
                  "pretrained_cfg": dict(model.pretrained_cfg)}
        return ModelSpec(self, config)

    def shape(self, config) -> Shape:
        model = self._skeleton(config)
        attn = model.blocks[0].attn
        return Shape(layers=len(model.blocks), heads=attn.num_heads, kv_heads=attn.num_heads,
                     head_dim=attn.head_dim, hidden=model.embed_dim, mlp=model.blocks[0].mlp.fc1.out_features)

    def layers(self, model):
        return model.blocks

    def new_config(self, config, shape, plan):
        new = target_shape(shape, plan)
        config = copy.deepcopy(config)
        args = config["model_args"]
        args.update(depth=new.layers, num_heads=new.heads)
        if plan.mlp:
            ratio = new.mlp / shape.hidden
            # timm sizes fc1 as int(dim * mlp_ratio): nudge the ratio if float rounding would lose a neuron.
            args["mlp_ratio"] = ratio if int(shape.hidden * ratio) == new.mlp else (new.mlp + 0.5) / shape.hidden
        return config

    def build(self, spec, empty):
        if empty:
            with init_empty_weights(include_buffers=False):
                model = self._create(spec.config)
        else:
            model = self._create(spec.config)
        if spec.config.get("pretrained_cfg"):  # keep the source's preprocessing and labels
            model.pretrained_cfg = {**copy.deepcopy(spec.config["pretrained_cfg"]),
                                    "architecture": spec.config["architecture"]}
        return model

    def embedding_modules(self, model):
        names = ("patch_embed", "pos_embed", "cls_token", "reg_token")
        return [x for x in (getattr(model, n, None) for n in names) if x is not None]

    def save(self, model, spec, out: Path):
        from timm.models import save_for_hf

        save_for_hf(model, out, safe_serialization=True)

    def _skeleton(self, config):
        with init_empty_weights(include_buffers=False):
            return self._create(config)

    @staticmethod
    def _create(config):
        import timm

        return timm.create_model(config["architecture"], pretrained=False, **config["model_args"])


TIMM_VIT = TimmViT()
