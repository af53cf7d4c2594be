"""timm families, rebuilt through `timm.create_model`: the shared base, and VisionTransformer (vit_*, deit_*).

timm is imported on first use: it costs seconds of start-up that users of other families should not pay.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
from pathlib import Path

from torch import nn

from ..errors import fail
from ..plan import Shape, target_shape
from .base import BlockWeights, Family, ModelSpec, Proj, meta_parameters


@functools.lru_cache(maxsize=8)  # claims, shape and inspect all read the same config: build it once
def _skeleton(architecture: str, model_args: str) -> nn.Module:
    try:
        with meta_parameters():
            return TimmFamily._create({"architecture": architecture, "model_args": json.loads(model_args)})
    except Exception as e:  # e.g. num_heads 0: a broken source config, named as such rather than a traceback
        raise fail("config.json model_args", model_args, f"timm cannot build {architecture} from them "
                   f"({type(e).__name__}: {(str(e).strip().splitlines() or ['no message'])[0][:120]}), so the "
                   "source model is broken (not the plan)", "fix the source's config.json or re-download the model") \
            from None


class TimmFamily(Family):
    """A timm architecture, known by its name and model args ({"architecture", "model_args"}).
    Subclasses name their model class and map the plan onto its model args."""

    library = "timm"
    model_class: str  # "module:Class" of the timm model class this family claims
    embedding_names: tuple[str, ...] = ()  # attributes counted as embeddings

    def claims(self, obj) -> bool:
        if isinstance(obj, nn.Module) and not type(obj).__module__.startswith("timm."):
            return False
        if not isinstance(obj, (nn.Module, dict)):
            return False
        import timm

        module, name = self.model_class.split(":")
        cls = getattr(importlib.import_module(module), name)
        if isinstance(obj, dict) and timm.is_model(obj.get("architecture", "")):
            # An architecture is built (on the meta device) to check its class only when its own timm module
            # uses this family's class: others (Swin v2, whose constructor copies into a buffer, which the
            # meta device cannot hold) are never built here.
            from timm.models._registry import _model_to_module, split_model_name_tag

            arch = split_model_name_tag(obj["architecture"])[0]
            arch_module = importlib.import_module(f"timm.models.{_model_to_module[arch]}")
            if not any(isinstance(v, type) and issubclass(v, cls) for v in vars(arch_module).values()):
                return False
            obj = self._skeleton(obj)
        return isinstance(obj, cls)

    def spec(self, model):
        from timm.models import get_model_args

        arch = getattr(model, "pretrained_cfg", {}).get("architecture")
        if not arch or not hasattr(model, "_model_args"):
            raise fail("model", type(model).__name__, "was not built by timm.create_model, so its architecture is unknown",
                       "create it with timm.create_model(name, ...)")
        config = {"architecture": arch, "model_args": get_model_args(model),
                  "pretrained_cfg": dict(model.pretrained_cfg)}
        return ModelSpec(self, config)

    def layers(self, model):
        return model.blocks

    def build(self, spec, empty):
        if empty:
            with meta_parameters():
                model = self._create(spec.config)
        else:
            model = self._create(spec.config)
        if spec.config.get("pretrained_cfg"):  # keep the source's preprocessing and labels
            model.pretrained_cfg = {**copy.deepcopy(spec.config["pretrained_cfg"]),
                                    "architecture": spec.config["architecture"]}
        return model

    def embedding_modules(self, model):
        return [x for x in (getattr(model, n, None) for n in self.embedding_names) if x is not None]

    def save(self, model, spec, out: Path):
        from timm.models import save_for_hf

        save_for_hf(model, out, model_config=self.extra_config(model) or None, safe_serialization=True)

    def save_config(self, model: nn.Module, out: Path) -> None:
        """config.json alone, as `save` writes it (it reads no weights: `model` may be on the meta device).
        Streaming conversion (reshape/streaming.py) writes the weights itself."""
        from timm.models._hub import save_config_for_hf

        save_config_for_hf(model, Path(out) / "config.json", model_config=self.extra_config(model) or None)

    def extra_config(self, model: nn.Module) -> dict:
        """config.json keys beyond timm's own that rebuilding `model` needs (none for plain timm models)."""
        return {}

    def timm_loads(self, config: dict) -> bool:
        """Does timm.create_model alone rebuild this config? False where reshape swapped in its own modules
        (Family.needs_reshape says why)."""
        return self.needs_reshape(config) is None

    def _skeleton(self, config):
        """A meta-device model of `config`, to read shapes from; shared, so callers must not change it."""
        return _skeleton(config["architecture"], json.dumps(config["model_args"], sort_keys=True, default=str))

    @staticmethod
    def _create(config):
        import timm

        return timm.create_model(config["architecture"], pretrained=False, **config["model_args"])

    @staticmethod
    def _new_args(config, **args) -> dict:
        """A copy of `config` with these model args replaced."""
        config = copy.deepcopy(config)
        config["model_args"].update(args)
        return config


class TimmStagedFamily(TimmFamily):
    """A hierarchical timm model: `model.<stages_attr>[i].blocks` is stage i's block stack (see reshape/stages.py)."""

    staged = True
    stages_attr: str

    def layers(self, model):
        """Every block of every stage, in order (for measurements that walk the blocks)."""
        return nn.ModuleList([block for stage in getattr(model, self.stages_attr) for block in stage.blocks])

    def stage_prefixes(self, model) -> list[str]:
        """Where each stage's blocks live in the state dict, in stage order."""
        return [f"{self.stages_attr}.{i}.blocks." for i in range(len(getattr(model, self.stages_attr)))]


def timm_block_weights(prefix: str = "", **per_head) -> BlockWeights:
    """The weight map of timm's usual block under `prefix`: a fused attn.qkv, attn.proj, mlp.fc1, mlp.fc2;
    `per_head`: BlockWeights' per-head fields."""
    return BlockWeights(attn_in=(Proj(f"{prefix}attn.qkv", ("q", "k", "v")),), attn_out=Proj(f"{prefix}attn.proj"),
                        mlp_in=(Proj(f"{prefix}mlp.fc1"),), mlp_out=Proj(f"{prefix}mlp.fc2"), **per_head)


def mlp_ratio(hidden: int, mlp: int) -> float:
    """The mlp_ratio that makes timm's int(hidden * mlp_ratio) equal `mlp`, nudged where float rounding
    would lose a neuron."""
    ratio = mlp / hidden
    return ratio if int(hidden * ratio) == mlp else (mlp + 0.5) / hidden


class TimmViT(TimmFamily):
    name = "timm-vit"
    covers = "timm VisionTransformer (vit_*, deit_* including distilled DeiT)"
    model_class = "timm.models.vision_transformer:VisionTransformer"  # DeiT's distilled model subclasses it
    embedding_names = ("patch_embed", "pos_embed", "cls_token", "reg_token", "dist_token")
    weights = timm_block_weights()
    # VisionTransformer's model args have no attention head dim, so a saved config could not rebuild it.
    can_widen_attention = False

    def shape(self, config) -> Shape:
        model = self._skeleton(config)
        attn = model.blocks[0].attn
        return Shape(layers=len(model.blocks), heads=attn.num_heads, kv_heads=attn.num_heads,
                     head_dim=attn.head_dim, hidden=model.embed_dim, mlp=model.blocks[0].mlp.fc1.out_features)

    def new_config(self, config, shape, plan):
        new = target_shape(shape, plan)
        args = dict(depth=new.layers, num_heads=new.heads)
        if plan.mlp:
            args["mlp_ratio"] = mlp_ratio(shape.hidden, new.mlp)
        return self._new_args(config, **args)


TIMM_VIT = TimmViT()
