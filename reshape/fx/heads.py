"""Re-heading attention inside a traced block (keep-width: the same Q/K/V/O weights read as more,
narrower heads).

`locate` finds where the head count enters the graph: an nn.MultiheadAttention call (its
num_heads/head_dim attributes), or the view/reshape that splits Q, K and V into heads before
F.scaled_dot_product_attention or an explicit matmul -> softmax -> matmul. Module attributes such as
`num_heads`, `n_head` or `nhead` read in forward are constants in the traced graph, so they are found
there, in the view's arguments (a head count, a head dim, or `width // heads`). The walk from the view
to the attention follows the dimensions through permute/transpose/unbind/indexing, so it knows which
argument is the head count and which the head dim without running the model. `reshape` rewrites those
arguments and every constant softmax scale (scaled by sqrt(old/new head dim), so 1/sqrt(d) becomes
1/sqrt(d_new) and custom scales keep their ratio to it). Anything it cannot account for — learned
per-head biases, norms or rotary positions over the head dim, computed head counts — is an error
naming the node, never a silent guess.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import fail

VIEWS = {"view", "reshape"}
SOFTMAX = {torch.softmax, F.softmax}
MATMUL = {operator.matmul, torch.matmul, torch.bmm}
PASS_METHODS = {"contiguous", "float", "half", "bfloat16", "type_as", "to", "clone"}
PASS_MODULES = (nn.Identity, nn.Dropout)


class Unsupported(Exception):
    """The attention is there but reshape cannot re-head it; the message names the node and why."""


@dataclass
class Split:
    """A view/reshape that splits a projection into heads, and where its head count and head dim sit."""

    view: fx.Node
    head_pos: int | None  # index into the shape arguments; None: heads folded into the batch (B*H)
    dim_pos: int


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

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


def _is(node, op, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == op and node.target in targets


def _module(gm, node):
    return gm.get_submodule(node.target) if isinstance(node, fx.Node) and node.op == "call_module" else None


def _shape_args(view: fx.Node) -> list:
    args = list(view.args[1:])
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = list(args[0])
    if "shape" in view.kwargs:
        args = list(view.kwargs["shape"])
    return args


def _set_shape_arg(view: fx.Node, pos: int, value) -> None:
    args = _shape_args(view)
    args[pos] = value
    if "shape" in view.kwargs:
        view.kwargs = {**view.kwargs, "shape": tuple(args)}
    elif len(view.args) == 2 and isinstance(view.args[1], (tuple, list)):
        view.args = (view.args[0], tuple(args))
    else:
        view.args = (view.args[0], *args)


def _uses_params(gm, node, seen=None) -> bool:
    """Does this value depend on a learned parameter of the block (a per-head bias, a learned scale)?"""
    seen = set() if seen is None else seen
    if not isinstance(node, fx.Node) or node in seen or node.op == "placeholder":
        return False
    seen.add(node)
    if node.op == "get_attr" and isinstance(getattr_path(gm, node.target), nn.Parameter):
        return True
    if node.op == "call_module" and any(True for _ in _module(gm, node).parameters()):
        return True
    return any(_uses_params(gm, a, seen) for a in node.all_input_nodes)


def getattr_path(gm, target):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _only_sizes(node, seen=None) -> bool:
    """Is this a value computed from tensor sizes only (a run-time scale such as k.size(-1) ** -0.5)?"""
    if not isinstance(node, fx.Node):
        return True
    if node.op == "call_method" and node.target == "size" or node.op == "call_function" and node.target is getattr:
        return True
    if node.op != "call_function":
        return False
    return all(_only_sizes(a) for a in node.all_input_nodes)


def _scalar(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _walk_to_split(gm, node: fx.Node, scales: list) -> tuple[fx.Node, list]:
    """Follow q, k or v back to the view that splits heads; return it and the ops in between
    (forward order). Constant scales met on the way are recorded."""
    ops = []
    while True:
        if _is(node, "call_method", VIEWS) or _is(node, "call_function", {torch.reshape}):
            return node, ops[::-1]
        if _is(node, "call_method", {"permute"}):
            dims = node.args[1:] if not isinstance(node.args[1], (tuple, list)) else node.args[1]
            ops.append(("permute", tuple(dims)))
        elif _is(node, "call_method", {"transpose"}) or _is(node, "call_function", {torch.transpose}):
            ops.append(("transpose", node.args[1], node.args[2]))
        elif _is(node, "call_method", PASS_METHODS):
            pass
        elif isinstance(_module(gm, node), PASS_MODULES):
            pass
        elif _is(node, "call_function", {operator.getitem}) and isinstance(node.args[1], int):
            src = node.args[0]
            if _is(src, "call_method", {"unbind"}) or _is(src, "call_function", {torch.unbind}):
                ops.append(("select", src.args[1] if len(src.args) > 1 else src.kwargs.get("dim", 0)))
                node = src
            else:  # qkv[0]: indexing drops the leading axis
                ops.append(("select", 0))
        elif _is(node, "call_function", {operator.mul, operator.truediv}) and _scalar(node.args[1]):
            scales.append((node, 1))
        elif _is(node, "call_function", {operator.mul}) and _scalar(node.args[0]):
            scales.append((node, 0))
            node = node.args[1]  # scale * q: the tensor is the second operand
            continue
        elif _module(gm, node) is not None:
            raise Unsupported(f"passes through {node.target} ({type(_module(gm, node)).__name__}), which acts on "
                              "each head's features (e.g. a norm over the head dim)")
        else:
            raise Unsupported(f"passes through {node.format_node().split('=')[0].strip()} "
                              f"({getattr(node.target, '__name__', node.target)}) between the head split and the "
                              "attention (e.g. rotary positions), which ties it to the head dim")
        node = node.args[0]


def _split(gm, node: fx.Node, dim_axis: int, scales: list) -> Split:
    view, ops = _walk_to_split(gm, node, scales)
    axes = list(range(len(_shape_args(view))))
    for op in ops:
        if op[0] == "permute":
            axes = [axes[d] for d in op[1]]
        elif op[0] == "transpose":
            a, b = (d % len(axes) for d in op[1:])
            axes[a], axes[b] = axes[b], axes[a]
        else:
            del axes[op[1] % len(axes)]
    head_pos = axes[-3] if len(axes) >= 4 else None
    return Split(view, head_pos, axes[dim_axis])


def _count(arg) -> tuple[str, int] | None:
    """How a shape argument holds a number: ("const", n), ("div", n) for `x // n`, ("mul", n) for
    `x * n`; None when it is computed at run time."""
    if isinstance(arg, int):
        return ("const", arg)
    if _is(arg, "call_function", {operator.floordiv}) and isinstance(arg.args[1], int):
        return ("div", arg.args[1])
    if _is(arg, "call_function", {operator.mul}) and isinstance(arg.args[1], int):
        return ("mul", arg.args[1])
    return None


def _heads_and_dim(split: Split) -> tuple[int, int | None]:
    args = _shape_args(split.view)
    dim = _count(args[split.dim_pos])
    head = _count(args[split.head_pos]) if split.head_pos is not None else None
    if split.head_pos is None:  # (B * H, N, d): the head count is the constant factor of the batch
        first = _count(args[0])
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
    if _is(src, "call_function", {operator.getitem}):
        parent = src.args[0]
        if _is(parent, "call_method", {"split"}) and isinstance(parent.args[1], int):
            return parent.args[1]
        if _is(parent, "call_method", {"chunk"}) and isinstance(_module(gm, parent.args[0]), nn.Linear):
            return _module(gm, parent.args[0]).out_features // parent.args[1]
    linear = _module(gm, src)
    return linear.out_features if isinstance(linear, nn.Linear) else None


def _scores_path(gm, softmax: fx.Node, scales: list) -> fx.Node:
    """From a softmax back to the q @ k^T that feeds it, recording constant scales; refuse learned biases."""
    node = softmax.args[0]
    while not (_is(node, "call_function", MATMUL) or _is(node, "call_method", {"matmul"})):
        if _is(node, "call_function", {operator.mul, operator.truediv}) or _is(node, "call_method", {"mul", "div"}):
            const = [i for i in (0, 1) if _scalar(node.args[i])]
            if const:
                scales.append((node, const[0]))
            elif not _only_sizes(node.args[1]):
                raise Unsupported(f"scales its scores at {node.name} by a tensor, not a constant")
        elif _is(node, "call_function", {operator.add}) or _is(node, "call_method", {"masked_fill", "add"}):
            other = node.args[1] if isinstance(node.args[1], fx.Node) else None
            if other is not None and _uses_params(gm, other):
                raise Unsupported(f"adds a learned bias to its scores at {node.name}, which holds one value per "
                                  "source head")
        elif not (_is(node, "call_method", PASS_METHODS) or isinstance(_module(gm, node), PASS_MODULES)):
            raise Unsupported(f"computes its scores through {node.name}, which reshape cannot follow")
        node = node.args[0]
    return node


def _value_matmul(gm, softmax: fx.Node) -> fx.Node:
    node = softmax
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise Unsupported(f"uses its attention weights {node.name} more than once")
        node = users[0]
        if _is(node, "call_function", MATMUL) or _is(node, "call_method", {"matmul"}):
            return node
        if not (isinstance(_module(gm, node), PASS_MODULES) or _is(node, "call_function", {F.dropout})
                or _is(node, "call_method", PASS_METHODS)):
            raise Unsupported(f"passes its attention weights through {node.name} before the values")


def locate(gm: fx.GraphModule) -> list[Site]:
    """Every attention in the block graph, with its head count and head dim."""
    sites = []
    for node in gm.graph.nodes:
        module = _module(gm, node)
        if isinstance(module, nn.MultiheadAttention):
            sites.append(Site("mha", node, module.num_heads, module.num_heads, module.head_dim))
        elif _is(node, "call_function", {F.scaled_dot_product_attention}):
            scales: list = []
            q, k, v = (node.args[i] if len(node.args) > i else node.kwargs[n]
                       for i, n in enumerate(("query", "key", "value")))
            mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
            if isinstance(mask, fx.Node) and _uses_params(gm, mask):
                raise Unsupported(f"passes a learned attention bias to {node.name}, which holds one value per "
                                  "source head")
            splits = [_split(gm, q, -1, scales), _split(gm, k, -1, scales), _split(gm, v, -1, scales)]
            if isinstance(node.kwargs.get("scale"), (int, float)):
                scales.append((node, "scale"))
            sites.append(_site("sdpa", gm, node, splits, scales))
        elif _is(node, "call_function", SOFTMAX) or _is(node, "call_method", {"softmax"}):
            scales = []
            scores = _scores_path(gm, node, scales)
            values = _value_matmul(gm, node)
            splits = [_split(gm, scores.args[0], -1, scales), _split(gm, scores.args[1], -2, scales),
                      _split(gm, values.args[1], -1, scales)]
            sites.append(_site("matmul", gm, node, splits, scales))
    return sites


def _site(kind, gm, node, splits, scales) -> Site:
    (heads, head_dim), (kv_heads, _), _ = (_heads_and_dim(s) for s in splits)
    if head_dim is None:
        width = _width_of(gm, splits[0].view)
        if width is None or width % heads:
            raise Unsupported(f"splits heads at {splits[0].view.name} with a head dim computed at run time")
        head_dim = width // heads
    return Site(kind, node, heads, kv_heads, head_dim, splits, scales)


def reshape_heads(gm: fx.GraphModule, sites: list[Site], heads: int) -> fx.GraphModule:
    """Keep-width: read every located attention as `heads` heads of width/heads, with the softmax
    scale of the new head dim. The plan has checked that the numbers divide."""
    done = set()
    for site in sites:
        ratio = Fraction(heads, site.heads)  # new heads per old head
        new_dim = Fraction(site.head_dim) / ratio
        if site.kind == "mha":
            module = gm.get_submodule(site.node.target)
            module.num_heads, module.head_dim = heads, int(new_dim)
            continue
        for split in site.splits:
            if split.view in done:  # q, k and v often share one fused view
                continue
            done.add(split.view)
            args = _shape_args(split.view)
            positions = [split.dim_pos] + ([split.head_pos] if split.head_pos is not None else [0])
            for pos in positions:
                arg, is_dim = args[pos], pos == split.dim_pos
                count = _count(arg)
                if count is None or count[1] == -1:
                    continue  # run-time size or -1: follows the other argument
                kind, n = count
                # A head dim shrinks by `ratio`, a head count (or the divisor of a head dim) grows by it.
                grows = (kind == "div") == is_dim
                new = n * ratio if grows else n / ratio
                if kind == "const":
                    _set_shape_arg(split.view, pos, int(new))
                else:  # x // n or x * n: rewrite the constant inside
                    arg.args = (arg.args[0], int(new))
        # Each constant scale is multiplied by sqrt(old/new head dim), split evenly when the scale is
        # applied in several places (e.g. to q and to k).
        factor = math.sqrt(site.head_dim / new_dim) ** (1 / max(len(site.scales), 1))
        for node, where in site.scales:
            if where == "scale":
                node.kwargs = {**node.kwargs, "scale": node.kwargs["scale"] * factor}
                continue
            args = list(node.args)
            divides = node.target in (operator.truediv,) or node.target == "div"
            args[where] = args[where] / factor if divides else args[where] * factor
            node.args = tuple(args)
    gm.graph.lint()
    gm.recompile()
    return gm


def check_heads(sites: list[Site], name: str) -> Site:
    """The block's attentions must agree on their shape; return the first."""
    first = sites[0]
    for site in sites[1:]:
        if (site.heads, site.kv_heads, site.head_dim) != (first.heads, first.kv_heads, first.head_dim):
            raise fail("model", name, f"has attentions with different head counts ({first.heads} at "
                       f"{first.node.name}, {site.heads} at {site.node.name})",
                       "change the depth only (leave heads out)")
    return first
