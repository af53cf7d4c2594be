"""Finding attention in a traced block: where the head count enters the graph, and its head dim.

`locate` finds an nn.MultiheadAttention call (its num_heads/head_dim attributes), or the view/reshape that
splits Q, K and V into heads before F.scaled_dot_product_attention or an explicit matmul -> softmax ->
matmul. Module attributes such as `num_heads`, `n_head` or `nhead` read in forward are constants in the
traced graph, so they are found there, in the view's arguments (a head count, a head dim, or
`width // heads`). The walk from the view to the attention follows the dimensions through
permute/transpose/unbind/indexing, so it knows which argument is the head count and which the head dim
without running the model. Constant softmax scales and learned biases added to the scores are recorded
for the rewrites. Anything it cannot account for (norms or rotary positions over the head dim, computed
head counts) is an `Unsupported` naming the node, never a silent guess.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import fail
from .graph import (MATMUL, PASS_METHODS, PASS_MODULES, SOFTMAX, VIEWS, Unsupported, count_of, getattr_path, is_op,
                    is_scalar, module_of, only_sizes, permute_dims, shape_args, uses_params)


@dataclass
class Split:
    """A view/reshape that splits a projection into heads, and where its head count and head dim sit."""

    view: fx.Node
    head_pos: int | None  # index into the shape arguments; None: heads folded into the batch (B*H)
    dim_pos: int
    ndim: int = 4  # dims of the q, k or v that reaches the attention


@dataclass
class Site:
    """One attention in a block graph."""

    kind: str  # "mha", "sdpa" or "matmul"
    node: fx.Node
    heads: int
    kv_heads: int
    head_dim: int
    splits: list[Split] = field(default_factory=list)  # q, k, v
    scales: list[tuple[fx.Node, int]] = field(default_factory=list)  # (node, arg index) of constant scales
    # (node, arg index or kwarg name) of learned biases added to the scores (relative position biases,
    # LeViT's attention biases): one value per source head, which each new head inherits from its parent.
    biases: list[tuple[fx.Node, int | str]] = field(default_factory=list)

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


def _walk_to_split(gm, node: fx.Node, scales: list) -> tuple[fx.Node, list]:
    """Follow q, k or v back to the view that splits heads; return it and the ops in between
    (forward order). Constant scales met on the way are recorded."""
    ops = []
    while True:
        if is_op(node, "call_method", VIEWS) or is_op(node, "call_function", {torch.reshape}):
            return node, ops[::-1]
        if is_op(node, "call_method", {"permute"}):
            ops.append(("permute", permute_dims(node)))
        elif is_op(node, "call_method", {"transpose"}) or is_op(node, "call_function", {torch.transpose}):
            ops.append(("transpose", node.args[1], node.args[2]))
        elif is_op(node, "call_method", PASS_METHODS):
            pass
        elif isinstance(module_of(gm, node), PASS_MODULES):
            pass
        elif is_op(node, "call_function", {operator.getitem}) and isinstance(node.args[1], int):
            src = node.args[0]
            if is_op(src, "call_method", {"unbind"}) or is_op(src, "call_function", {torch.unbind}):
                ops.append(("select", src.args[1] if len(src.args) > 1 else src.kwargs.get("dim", 0)))
                node = src
            else:  # qkv[0]: indexing drops the leading axis
                ops.append(("select", 0))
        elif is_op(node, "call_function", {operator.mul, operator.truediv}) and is_scalar(node.args[1]):
            scales.append((node, 1))
        elif is_op(node, "call_function", {operator.mul}) and is_scalar(node.args[0]):
            scales.append((node, 0))
            node = node.args[1]  # scale * q: the tensor is the second operand
            continue
        elif module_of(gm, node) is not None:
            raise Unsupported(f"passes through {node.target} ({type(module_of(gm, node)).__name__}), which acts on "
                              "each head's features (e.g. a norm over the head dim)")
        else:
            raise Unsupported(f"passes through {node.format_node().split('=')[0].strip()} "
                              f"({getattr(node.target, '__name__', node.target)}) between the head split and the "
                              "attention (e.g. rotary positions), which ties it to the head dim")
        node = node.args[0]


def _split(gm, node: fx.Node, dim_axis: int, scales: list) -> Split:
    view, ops = _walk_to_split(gm, node, scales)
    axes = list(range(len(shape_args(view))))
    for op in ops:
        if op[0] == "permute":
            axes = [axes[d] for d in op[1]]
        elif op[0] == "transpose":
            a, b = (d % len(axes) for d in op[1:])
            axes[a], axes[b] = axes[b], axes[a]
        else:
            del axes[op[1] % len(axes)]
    head_pos = axes[-3] if len(axes) >= 4 else None
    return Split(view, head_pos, axes[dim_axis], len(axes))


def _heads_and_dim(split: Split) -> tuple[int, int | None]:
    args = shape_args(split.view)
    dim = count_of(args[split.dim_pos])
    head = count_of(args[split.head_pos]) if split.head_pos is not None else None
    if split.head_pos is None:  # (B * H, N, d): the head count is the constant factor of the batch
        first = count_of(args[0])
        head = first if first and first[0] == "mul" else None
    heads = head[1] if head and head[0] in ("const", "mul") and head[1] != -1 else (
        dim[1] if dim and dim[0] == "div" else None)
    head_dim = dim[1] if dim and dim[0] == "const" and dim[1] != -1 else (
        head[1] if head and head[0] == "div" else None)
    if heads is None:
        raise Unsupported(f"splits heads at {split.view.name} with a head count computed at run time")
    return heads, head_dim


def _width_of(gm, view: fx.Node) -> int | None:
    """The projection width feeding a head split: a split/chunk piece or a Linear's outputs."""
    src = view.args[0]
    if is_op(src, "call_function", {operator.getitem}):
        parent = src.args[0]
        if is_op(parent, "call_method", {"split"}) and isinstance(parent.args[1], int):
            return parent.args[1]
        if is_op(parent, "call_method", {"chunk"}) and isinstance(module_of(gm, parent.args[0]), nn.Linear):
            return module_of(gm, parent.args[0]).out_features // parent.args[1]
    linear = module_of(gm, src)
    weight = None
    if is_op(src, "call_function", {F.linear}):
        weight = src.args[1] if len(src.args) > 1 else src.kwargs.get("weight")
    if isinstance(linear, nn.Linear):
        width = linear.out_features
    elif isinstance(weight, fx.Node) and weight.op == "get_attr":
        width = getattr_path(gm, weight.target).shape[0]  # F.linear(x, self.qkv.weight, bias): BEiT, EVA
    else:
        return None
    args = shape_args(view)
    if len(args) == 5 and args[2] == 3:  # (batch, tokens, 3, heads, head dim): q, k and v share the rows
        width //= 3
    return width


def _scores_path(gm, softmax: fx.Node, scales: list, biases: list) -> fx.Node:
    """From a softmax back to the q @ k^T that feeds it, recording constant scales and learned biases."""
    node = softmax.args[0]
    while not (is_op(node, "call_function", MATMUL) or is_op(node, "call_method", {"matmul"})):
        if is_op(node, "call_function", {operator.mul, operator.truediv}) or is_op(node, "call_method", {"mul", "div"}):
            const = [i for i in (0, 1) if is_scalar(node.args[i])]
            if const:
                scales.append((node, const[0]))
            elif not only_sizes(node.args[1]):
                raise Unsupported(f"scales its scores at {node.name} by a tensor, not a constant")
        elif is_op(node, "call_function", {operator.add}) or is_op(node, "call_method", {"masked_fill", "add"}):
            other = node.args[1] if isinstance(node.args[1], fx.Node) else None
            if other is not None and uses_params(gm, other):
                biases.append((node, 1))
        elif not (is_op(node, "call_method", PASS_METHODS) or isinstance(module_of(gm, node), PASS_MODULES)):
            raise Unsupported(f"computes its scores through {node.name}, which reshape cannot follow")
        node = node.args[0]
    return node


def value_matmul(gm, softmax: fx.Node) -> fx.Node:
    node = softmax
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise Unsupported(f"uses its attention weights {node.name} more than once")
        node = users[0]
        if is_op(node, "call_function", MATMUL) or is_op(node, "call_method", {"matmul"}):
            return node
        if not (isinstance(module_of(gm, node), PASS_MODULES) or is_op(node, "call_function", {F.dropout})
                or is_op(node, "call_method", PASS_METHODS)):
            raise Unsupported(f"passes its attention weights through {node.name} before the values")


def locate(gm: fx.GraphModule) -> list[Site]:
    """Every attention in the block graph, with its head count and head dim."""
    sites = []
    for node in gm.graph.nodes:
        module = module_of(gm, node)
        if isinstance(module, nn.MultiheadAttention):
            sites.append(Site("mha", node, module.num_heads, module.num_heads, module.head_dim))
        elif is_op(node, "call_function", {F.scaled_dot_product_attention}):
            scales: list = []
            q, k, v = (node.args[i] if len(node.args) > i else node.kwargs[n]
                       for i, n in enumerate(("query", "key", "value")))
            mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
            biases = []
            if isinstance(mask, fx.Node) and uses_params(gm, mask):  # a learned bias, e.g. relative positions
                biases.append((node, 3 if len(node.args) > 3 else "attn_mask"))
            splits = [_split(gm, q, -1, scales), _split(gm, k, -1, scales), _split(gm, v, -1, scales)]
            if isinstance(node.kwargs.get("scale"), (int, float)):
                scales.append((node, "scale"))
            sites.append(_site("sdpa", gm, node, splits, scales, biases))
        elif is_op(node, "call_function", SOFTMAX) or is_op(node, "call_method", {"softmax"}):
            scales, biases = [], []
            scores = _scores_path(gm, node, scales, biases)
            values = value_matmul(gm, node)
            splits = [_split(gm, scores.args[0], -1, scales), _split(gm, scores.args[1], -2, scales),
                      _split(gm, values.args[1], -1, scales)]
            sites.append(_site("matmul", gm, node, splits, scales, biases))
    return sites


def _site(kind, gm, node, splits, scales, biases=()) -> Site:
    (heads, head_dim), (kv_heads, _), _ = (_heads_and_dim(s) for s in splits)
    if head_dim is None:
        width = _width_of(gm, splits[0].view)
        if width is None or width % heads:
            raise Unsupported(f"splits heads at {splits[0].view.name} with a head dim computed at run time")
        head_dim = width // heads
    if biases and any(split.ndim != 4 for split in splits):
        raise Unsupported(f"adds a learned bias to its scores at {biases[0][0].name} with its heads folded into "
                          "another axis, so reshape cannot tell which values belong to which head")
    return Site(kind, node, heads, kv_heads, head_dim, splits, scales, list(biases))


def check_heads(sites: list[Site], name: str) -> Site:
    """The block's attentions must agree on their shape; return the first."""
    first = sites[0]
    for site in sites[1:]:
        if (site.heads, site.kv_heads, site.head_dim) != (first.heads, first.kv_heads, first.head_dim):
            raise fail("model", name, f"has attentions with different head counts ({first.heads} at "
                       f"{first.node.name}, {site.heads} at {site.node.name})",
                       "change the depth only (leave heads out)")
    return first
