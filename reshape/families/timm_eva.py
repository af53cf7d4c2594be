"""timm Eva (eva02_*, eva_*, the RoPE ViTs vit_*_rope_*, and other models timm builds with its Eva class).

Rebuilt through `timm.create_model(arch, depth=..., num_heads=...)`. The block's weight map is read
from the model, since Eva's options change it:

- attention inputs: one fused `attn.qkv` (EVA-02 keeps its q and v biases apart, as `attn.q_bias` and
  `attn.v_bias`; the k bias is a zero buffer) or separate `attn.q_proj` / `attn.k_proj` / `attn.v_proj`;
- MLP: `mlp.fc1` / `mlp.fc2`; SwiGLU as `mlp.fc1_g` and `mlp.fc1_x` (two inputs); or GluMlp, whose
  one `mlp.fc1` holds both halves (its neurons are not sliced: `--mlp` is refused).

Heads are keep-width only: Eva's model args have no head dim, so a saved config could not express an
attention wider than the model. Everything of width heads x head dim (q/v biases, the optional
attention output gate and norm over the attention width) keeps its shape and its values. Rotary
positions rotate channel pairs within each head, so a new head count changes what the heads compute
(as for LLaMA) and the function-aware split does not apply. The rotary tables depend on the head dim;
they are non-persistent buffers, built by timm's constructor for the new head count, never copied.
Mixed-mode RoPE (vit_*_rope_mixed_*) learns per-layer, per-head frequencies outside the blocks and is
not claimed.
"""

from __future__ import annotations

from torch import nn

from ..errors import Problem
from ..plan import Shape, target_shape
from .base import BlockWeights, Proj
from .timm_vit import TimmFamily, mlp_ratio


def _block_weights(block: nn.Module) -> BlockWeights:
    attn, mlp = block.attn, block.mlp
    if getattr(attn, "qkv", None) is not None:
        attn_in = (Proj("attn.qkv", ("q", "k", "v")),)
    else:
        attn_in = (Proj("attn.q_proj", ("q",)), Proj("attn.k_proj", ("k",)), Proj("attn.v_proj", ("v",)))
    if hasattr(mlp, "fc1_g"):
        mlp_in = (Proj("mlp.fc1_g"), Proj("mlp.fc1_x"))
    else:
        mlp_in = (Proj("mlp.fc1"),)
    return BlockWeights(attn_in=attn_in, attn_out=Proj("attn.proj"), mlp_in=mlp_in, mlp_out=Proj("mlp.fc2"))


def _mlp_refusal(block: nn.Module) -> str | None:
    """Why this block's MLP neurons cannot be sliced, or None."""
    mlp = block.mlp
    if not hasattr(mlp, "fc1_g") and mlp.fc1.out_features != mlp.fc2.in_features:
        return "would slice a GluMlp, whose one fc1 holds both the gate and the value halves"
    if not isinstance(getattr(mlp, "norm", None), (nn.Identity, type(None))):
        return "would slice the MLP's inner norm (scale_mlp), which reshape does not do for Eva"
    return None


class TimmEva(TimmFamily):
    name = "timm-eva"
    covers = "timm Eva (eva02_*, eva_*, RoPE ViTs vit_*_rope_* except mixed-mode RoPE)"
    model_class = "timm.models.eva:Eva"
    embedding_names = ("patch_embed", "pos_embed", "cls_token", "reg_token")
    # Eva's model args have no head dim (its attention's attn_head_dim is not exposed).
    can_widen_attention = False
    # Rotary positions: keep-width heads stay contiguous and change the function.
    can_split_aware = False

    def __init__(self, weights: BlockWeights | None = None, refuses: dict[str, str] | None = None,
                 qk_norm: bool = False):
        # The registered instance's map is the usual one; `resolve` returns the map of the model at hand.
        self.weights = weights or BlockWeights(
            attn_in=(Proj("attn.qkv", ("q", "k", "v")),), attn_out=Proj("attn.proj"),
            mlp_in=(Proj("mlp.fc1"),), mlp_out=Proj("mlp.fc2"))
        self.refuses = refuses or {}
        self.qk_norm = qk_norm

    def claims(self, obj) -> bool:
        if not super().claims(obj):
            return False
        model = obj if isinstance(obj, nn.Module) else self._skeleton(obj)
        if getattr(model, "rope_mixed", False):  # per-layer, per-head learnt frequencies outside the blocks
            return False
        kv = {getattr(b.attn, "num_kv_heads", b.attn.num_heads) for b in model.blocks}
        return len(kv) == 1  # a per-block KV head count is not one shape

    def resolve(self, obj):
        model = obj if isinstance(obj, nn.Module) else self._skeleton(obj)
        block = model.blocks[0]
        why = _mlp_refusal(block)
        return TimmEva(_block_weights(block), {"mlp": why} if why else {},
                       qk_norm=not isinstance(block.attn.q_norm, nn.Identity))

    def plan_problem(self, shape, plan):
        if self.qk_norm and plan.heads != shape.heads and plan.head_mode == "keep-width":
            return Problem("heads", plan.heads, "changes the head dim, which the per-head-dim q/k norms (qk_norm) "
                           "are sized by", f"keep {shape.heads} heads")
        return None

    def shape(self, config) -> Shape:
        model = self._skeleton(config)
        attn = model.blocks[0].attn
        return Shape(layers=len(model.blocks), heads=attn.num_heads,
                     kv_heads=getattr(attn, "num_kv_heads", attn.num_heads), head_dim=attn.head_dim,
                     hidden=model.embed_dim, mlp=model.blocks[0].mlp.fc2.in_features)

    def new_config(self, config, shape, plan):
        new = target_shape(shape, plan)
        args = dict(depth=new.layers, num_heads=new.heads)
        if config["model_args"].get("num_kv_heads") is not None:
            args["num_kv_heads"] = new.kv_heads
        if plan.mlp:
            args["mlp_ratio"] = mlp_ratio(shape.hidden, new.mlp)
        return self._new_args(config, **args)


TIMM_EVA = TimmEva()
