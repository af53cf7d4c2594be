"""Weight transfer, driven by the plan and a family's weight map. The algorithms live here once.

- Layers: kept source layers are renumbered into the new stack; others are dropped.
- Heads, keep-width: every Q/K/V/O shape stays. `contiguous` copies the weights bit for bit, read as
  more, narrower heads; `aware` (the default where it applies) rewrites the query/key rows so each new
  head keeps its parent head's attention pattern (reshape/headsplit.py).
- Heads, keep-head-dim (Net2Net): each new head copies the Q/K/V rows of a source head (in its KV
  group under grouped-query attention) and the output projection's columns of a source head that
  was copied c times are divided by c, so the block computes exactly what it did.
- MLP: the neurons whose weights have the largest norms stay.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
from torch import nn

from .errors import fail
from .families.base import BlockWeights, Proj
from .headsplit import aware_split
from .plan import Plan, Shape, head_sources, parent_heads, target_shape
from .stages import StagedPlan, StagedShape

Adjust = Callable[[dict, Shape, Plan], dict]  # a family's adjust_block


def transfer_state(source: dict[str, torch.Tensor], layers_prefix: str, weights: BlockWeights,
                   shape: Shape, plan: Plan, input_covs: dict[int, torch.Tensor] | None = None,
                   adjust: Adjust | None = None) -> dict[str, torch.Tensor]:
    """The new model's state dict from the source's. `layers_prefix` is e.g. 'bert.encoder.layer.'.
    `input_covs` (source layer -> attention input covariance) weights the aware head split; `adjust`
    (a family's `adjust_block`) finishes each block."""
    state: dict[str, torch.Tensor] = {}
    layers: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in source.items():
        if key.startswith(layers_prefix):
            index, rel = key[len(layers_prefix):].split(".", 1)
            layers[int(index)][rel] = tensor
        else:
            state[key] = tensor
    for new_index, old_index in enumerate(plan.keep):
        layer = transfer_block(layers[old_index], weights, shape, plan, (input_covs or {}).get(old_index), adjust)
        state.update({f"{layers_prefix}{new_index}.{rel}": t for rel, t in layer.items()})
    return state


def transfer_block(layer: dict[str, torch.Tensor], weights: BlockWeights, shape: Shape, plan: Plan,
                   input_cov: torch.Tensor | None = None, adjust: Adjust | None = None) -> dict[str, torch.Tensor]:
    """One kept block's new tensors from its source tensors (names relative to the block, e.g.
    'attention.self.query.weight'); `layer` is untouched. Streaming conversion (reshape/streaming.py)
    calls it once per block, `transfer_state` once per kept layer: one implementation for both.
    `adjust(layer, shape, plan)`, the family's `adjust_block`, applies the family's own rule last."""
    layer = dict(layer)
    # A block of another kind in a hybrid stack (LFM's convolutions, Qwen3-Next's linear attention) has
    # no such projections: its weights stay as they are. load_into still checks every shape.
    attention = not weights.attn_in or f"{weights.attn_in[0].name}.weight" in layer
    regroup = weights.interleaved and attention
    new_shape = target_shape(shape, plan)
    if regroup:
        _regroup(layer, weights, shape, to_groups=False)
    if attention and plan.head_mode == "keep-head-dim" and plan.heads != shape.heads:
        widen_heads(layer, weights, shape, new_shape)
    elif attention and plan.head_split == "aware":
        aware_split(layer, weights, shape, plan.heads, input_cov)
    if plan.mlp and f"{weights.mlp_out.name}.weight" in layer:
        _keep_neurons(layer, weights, plan.mlp)
    if weights.per_head and plan.heads != shape.heads:
        parents = torch.tensor(parent_heads(shape, plan))
        for name in weights.per_head:
            if name in layer:  # T5 keeps its relative attention bias in the first block only
                layer[name] = layer[name].index_select(weights.per_head_axis, parents)
    if regroup:
        _regroup(layer, weights, new_shape, to_groups=True)
    return adjust(layer, shape, plan) if adjust else layer


def transfer_stages(source: dict[str, torch.Tensor], prefixes: list[str], weights: BlockWeights,
                    shape: StagedShape, plan: StagedPlan, adjust: Adjust | None = None) -> dict[str, torch.Tensor]:
    """`transfer_state` once per stage: each pass renumbers one stage's blocks and keeps the rest."""
    for prefix, stage_shape, stage_plan in zip(prefixes, shape.stages, plan.stages):
        source = transfer_state(source, prefix, weights, stage_shape, stage_plan, adjust=adjust)
    return source


def load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Assign `state` to `model`, after checking every key and shape (nanoGPT-style)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise fail("model", f"{len(missing)} missing / {len(unexpected)} unexpected weights",
                   f"the rebuilt model does not match its source (e.g. {(missing + unexpected)[0]})",
                   "report this model to reshape's issue tracker")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise fail("model", key, f"has shape {tuple(tensor.shape)} but the rebuilt model expects "
                       f"{tuple(expected[key].shape)}", "report this model to reshape's issue tracker")
    model.load_state_dict(state, assign=True, strict=True)


def widen_heads(layer: dict, weights: BlockWeights, shape: Shape, new: Shape) -> None:
    q_heads = head_sources(shape, new.heads)
    # Without KV groups the K/V heads follow the query heads; with them, K/V are left as they are.
    kv_heads = q_heads if not shape.grouped else list(range(shape.kv_heads))
    rows = {"q": _units(q_heads, shape.head_dim), "k": _units(kv_heads, shape.head_dim),
            "v": _units(kv_heads, shape.head_dim)}
    width = shape.role_widths
    for proj in weights.attn_in:
        offset, index = 0, []
        for role in proj.roles:  # fused projections stack q, k, v along the output axis
            index.append(rows[role] + offset)
            offset += width[role]
        _select_out(layer, proj, torch.cat(index))
    copies = torch.bincount(torch.tensor(q_heads), minlength=shape.heads)
    scale = (1.0 / copies[torch.tensor(q_heads)]).repeat_interleave(shape.head_dim)
    _select_in(layer, weights.attn_out, rows["q"], scale)


def _regroup(layer: dict, weights: BlockWeights, shape: Shape, to_groups: bool) -> None:
    """Reorder a fused projection's rows between [q; k; v] (what the algorithms here read) and the
    layout grouped per KV head, [q heads of group 0, k0, v0, q heads of group 1, ...]."""
    per_group = shape.heads // shape.kv_heads
    d = shape.head_dim
    q_width = shape.heads * d
    kv_width = shape.kv_heads * d
    order = []
    for g in range(shape.kv_heads):  # row of [q; k; v] that lands at each grouped position
        order += list(range(g * per_group * d, (g + 1) * per_group * d))
        order += list(range(q_width + g * d, q_width + (g + 1) * d))
        order += list(range(q_width + kv_width + g * d, q_width + kv_width + (g + 1) * d))
    index = torch.tensor(order)
    if not to_groups:
        index = torch.argsort(index)
    for proj in weights.attn_in:
        if len(proj.roles) == 3:
            _select_out(layer, proj, index)


def _keep_neurons(layer: dict, weights: BlockWeights, width: int) -> None:
    score = _norms(layer, weights.mlp_out, axis="in")
    for proj in weights.mlp_in:
        score = score * _norms(layer, proj, axis="out")
    keep = torch.topk(score, width).indices.sort().values  # sorted: neuron order is kept
    for proj in weights.mlp_in:
        _select_out(layer, proj, keep)
    _select_in(layer, weights.mlp_out, keep)


def _units(heads: list[int], head_dim: int) -> torch.Tensor:
    return (torch.tensor(heads)[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _out_axis(proj: Proj) -> int:
    return 1 if proj.conv1d else 0


def _select_out(layer: dict, proj: Proj, index: torch.Tensor) -> None:
    """Keep (or repeat) output features of a projection, with their bias."""
    w = f"{proj.name}.weight"
    layer[w] = layer[w].index_select(_out_axis(proj), index)
    b = f"{proj.name}.bias"
    if b in layer:
        layer[b] = layer[b].index_select(0, index)


def _select_in(layer: dict, proj: Proj, index: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    """Keep (or repeat) input features of a projection, each optionally scaled; its bias is unchanged."""
    w = f"{proj.name}.weight"
    axis = 1 - _out_axis(proj)
    selected = layer[w].index_select(axis, index)
    if scale is not None:
        shape = [1, 1]
        shape[axis] = -1
        selected = selected * scale.to(selected.dtype).view(shape)
    layer[w] = selected


def _norms(layer: dict, proj: Proj, axis: str) -> torch.Tensor:
    """Per-neuron L2 norm of a projection's weight, over its output rows or input columns."""
    weight = layer[f"{proj.name}.weight"].float()
    neuron_axis = _out_axis(proj) if axis == "out" else 1 - _out_axis(proj)
    return weight.norm(dim=1 - neuron_axis)
