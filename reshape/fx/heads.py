"""Re-heading attention inside a traced block, in either head mode.

keep-width (`reshape_heads`): the same Q/K/V/O weights read as more, narrower heads.
keep-head-dim (`widen_heads`): more heads of the same head dim, so the attention width grows; the
Q/K/V and output nn.Linear modules are replaced by wider ones filled by transfer.py's Net2Net rule,
so the block computes exactly what it did.

`locate` finds where the head count enters the graph: an nn.MultiheadAttention call (its
num_heads/head_dim attributes), or the view/reshape that splits Q, K and V into heads before
F.scaled_dot_product_attention or an explicit matmul -> softmax -> matmul. Module attributes such as
`num_heads`, `n_head` or `nhead` read in forward are constants in the traced graph, so they are found
there, in the view's arguments (a head count, a head dim, or `width // heads`). The walk from the view
to the attention follows the dimensions through permute/transpose/unbind/indexing, so it knows which
argument is the head count and which the head dim without running the model. Keep-width rewrites
those arguments and every constant softmax scale (scaled by sqrt(old/new head dim), so 1/sqrt(d)
becomes 1/sqrt(d_new) and custom scales keep their ratio to it). Keep-head-dim also needs the
projections (`projections`): the Linear(s) whose rows the head split reads (one fused Linear viewed
as (..., 3, heads, head dim) or split/chunked into q, k, v, or three Linears) and the Linear that
reads the merged heads. A learned bias added to the scores (relative position tables, LeViT's
attention biases) holds one value per source head: every new head adds its parent head's (`per_head`).
Anything it cannot account for — norms or rotary positions over the head dim, computed head counts, projections it cannot pin down — is an error
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

from .. import transfer
from ..errors import fail
from ..families import BlockWeights, Proj
from ..plan import Plan, Shape, head_sources, target_shape

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
            ops.append(("permute", _permute_dims(node)))
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


def _permute_dims(node: fx.Node) -> tuple:
    return tuple(node.args[1:] if not isinstance(node.args[1], (tuple, list)) else node.args[1])


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
    return Split(view, head_pos, axes[dim_axis], len(axes))


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
    if isinstance(linear, nn.Linear):
        width = linear.out_features
    elif _is(src, "call_function", {F.linear}) and isinstance(
            weight := src.args[1] if len(src.args) > 1 else src.kwargs.get("weight"), fx.Node) and weight.op == "get_attr":
        width = getattr_path(gm, weight.target).shape[0]  # F.linear(x, self.qkv.weight, bias): BEiT, EVA
    else:
        return None
    args = _shape_args(view)
    if len(args) == 5 and args[2] == 3:  # (batch, tokens, 3, heads, head dim): q, k and v share the rows
        width //= 3
    return width


def _scores_path(gm, softmax: fx.Node, scales: list, biases: list) -> fx.Node:
    """From a softmax back to the q @ k^T that feeds it, recording constant scales and learned biases."""
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
                biases.append((node, 1))
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
            biases = []
            if isinstance(mask, fx.Node) and _uses_params(gm, mask):  # a learned bias, e.g. relative positions
                biases.append((node, 3 if len(node.args) > 3 else "attn_mask"))
            splits = [_split(gm, q, -1, scales), _split(gm, k, -1, scales), _split(gm, v, -1, scales)]
            if isinstance(node.kwargs.get("scale"), (int, float)):
                scales.append((node, "scale"))
            sites.append(_site("sdpa", gm, node, splits, scales, biases))
        elif _is(node, "call_function", SOFTMAX) or _is(node, "call_method", {"softmax"}):
            scales, biases = [], []
            scores = _scores_path(gm, node, scales, biases)
            values = _value_matmul(gm, node)
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


def per_head(bias: torch.Tensor, heads: int, parents: list[int]) -> torch.Tensor:
    """A score bias for the new heads: each takes its parent head's values (`parents[j]`: the source head
    of new head j). The heads axis is -3, as in the (batch, heads, queries, keys) scores; a bias without
    one (size 1 there, or fewer axes) is shared by every head and stays."""
    if bias.dim() < 3 or bias.size(-3) != heads or heads == 1:
        return bias
    return bias.index_select(-3, torch.tensor(parents, device=bias.device))


def _inherit_biases(gm: fx.GraphModule, site: Site, parents: list[int]) -> None:
    """Route every learned score bias of `site` through `per_head`, so each new head adds its parent's."""
    for node, where in site.biases:
        bias = node.args[where] if isinstance(where, int) else node.kwargs[where]
        with gm.graph.inserting_before(node):
            inherited = gm.graph.call_function(per_head, (bias, site.heads, parents))
        if isinstance(where, int):
            node.args = (*node.args[:where], inherited, *node.args[where + 1:])
        else:
            node.kwargs = {**node.kwargs, where: inherited}


def check_biases(site: Site, heads: int, keep_head_dim: bool) -> str | None:
    """Why `heads` cannot take this attention's per-head biases, or None."""
    if site.biases and not keep_head_dim and heads % site.heads:
        return (f"adds a learned bias per head to its scores ({site.biases[0][0].name}); in keep-width mode a new "
                f"head count must be a multiple of {site.heads} so each new head has one parent head")
    return None


def reshape_heads(gm: fx.GraphModule, sites: list[Site], heads: int) -> fx.GraphModule:
    """Keep-width: read every located attention as `heads` heads of width/heads, with the softmax
    scale of the new head dim. The plan has checked that the numbers divide."""
    done = set()
    for site in sites:
        ratio = Fraction(heads, site.heads)  # new heads per old head
        new_dim = Fraction(site.head_dim) / ratio
        if site.biases:  # contiguous split: new head j holds features of old head j // ratio
            _inherit_biases(gm, site, [int(j / ratio) for j in range(heads)])
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


# --- keep-head-dim: more heads of the same head dim, through wider projections -------------------------

FLATTEN = {"flatten"}


@dataclass
class Projections:
    """The nn.Linear calls around one attention, which keep-head-dim widens."""

    inputs: list[tuple[fx.Node, tuple[str, ...]]]  # (Linear call, the roles q/k/v of its output rows in order)
    pieces: fx.Node | None  # the split/chunk of one fused Linear into q, k and v, if any
    merge: fx.Node  # the view/reshape/flatten that merges the heads back
    output: fx.Node  # the Linear call that reads the merged heads


def _passes(gm, node) -> bool:
    return _is(node, "call_method", PASS_METHODS) or isinstance(_module(gm, node), PASS_MODULES)


def _only_user(node: fx.Node) -> fx.Node:
    users = list(node.users)
    if len(users) != 1:
        raise Unsupported(f"uses {node.name} {'more than once' if users else 'nowhere'}, so reshape cannot "
                          "follow it between the projections and the attention")
    return users[0]


def _linear(gm, node, what: str) -> fx.Node:
    """`node` must be the only call of a plain nn.Linear, whose shape is about to change."""
    if type(_module(gm, node)) is not nn.Linear:
        raise Unsupported(f"reads {what} from {getattr(node, 'name', node)}, which is not an nn.Linear call")
    if sum(n.op == "call_module" and n.target == node.target for n in gm.graph.nodes) != 1:
        raise Unsupported(f"calls {node.target} more than once, so it cannot be widened for one attention")
    return node


def _inputs(gm, site: Site) -> tuple[list, fx.Node | None]:
    """The Linear call(s) whose output rows the q, k and v head splits read, and the split between."""
    views = [s.view for s in site.splits]
    width = {"q": site.width, "k": site.kv_heads * site.head_dim, "v": site.kv_heads * site.head_dim}
    what = "the queries, keys and values"
    if views[0] is views[1] is views[2]:  # one Linear viewed as (..., 3, heads, head dim), timm-style
        view = views[0]
        linear = _linear(gm, view.args[0], what)
        if _shape_args(view)[-3] != 3 or _module(gm, linear).out_features != 3 * site.width:
            raise Unsupported(f"splits {linear.target}'s outputs at {view.name} other than as (..., 3, heads, "
                              "head dim), so reshape cannot tell which rows each head owns")
        _only_user(linear)
        return [(linear, ("q", "k", "v"))], None
    sources = [v.args[0] for v in views]
    if all(_is(x, "call_function", {operator.getitem}) for x in sources):  # nanoGPT: .split / .chunk
        pieces, indices = sources[0].args[0], [x.args[1] for x in sources]
        if (any(x.args[0] is not pieces for x in sources) or not all(isinstance(i, int) for i in indices)
                or sorted(indices) != [0, 1, 2] or len(pieces.users) != 3
                or not _is(pieces, "call_method", {"split", "chunk"})):
            raise Unsupported(f"splits the queries, keys and values at {pieces.name} other than into exactly "
                              "q, k and v by .split(width) or .chunk(3)")
        for x, view in zip(sources, views):
            if _only_user(x) is not view:
                raise Unsupported(f"uses {x.name} besides splitting it into heads")
        roles = tuple(role for _, role in sorted(zip(indices, "qkv")))  # in the Linear's output order
        sizes = [width[r] for r in roles]
        linear = _linear(gm, pieces.args[0], what)
        arg = pieces.args[1] if len(pieces.args) > 1 else None  # split(W), split([Wq, Wk, Wv]) or chunk(3)
        if pieces.target == "chunk":
            declared = [_module(gm, linear).out_features // 3] * 3 if arg == 3 else None
        else:
            declared = [arg] * 3 if isinstance(arg, int) else list(arg) if isinstance(arg, (list, tuple)) else None
        dim = pieces.args[2] if len(pieces.args) > 2 else pieces.kwargs.get("dim", 0)
        feature_dim = len(_shape_args(views[0])) - 2  # the view splits the Linear's last axis into heads
        if (declared != sizes or sum(sizes) != _module(gm, linear).out_features
                or dim not in (-1, feature_dim)):
            raise Unsupported(f"splits {linear.target}'s outputs at {pieces.name} other than into q, k and v "
                              f"of widths {', '.join(map(str, sizes))} along the last axis")
        _only_user(linear)
        return [(linear, roles)], pieces
    if len(set(sources)) == 3:  # one Linear each
        for x, role in zip(sources, "qkv"):
            _linear(gm, x, what)
            _only_user(x)
            if _module(gm, x).out_features != width[role]:
                raise Unsupported(f"splits {x.target}'s {_module(gm, x).out_features} outputs into {role} heads "
                                  f"of width {width[role]}")
        return [(x, (role,)) for x, role in zip(sources, "qkv")], None
    raise Unsupported(f"reads the queries, keys and values ({', '.join(v.name for v in views)}) neither from one "
                      "fused nn.Linear nor from three")


def _merge(gm, site: Site) -> tuple[fx.Node, fx.Node]:
    """From the attention output (batch, heads, tokens, head dim) forward to the view that merges the
    heads and the Linear that reads it; its input columns must be head-major, as the rows were."""
    node = site.node if site.kind == "sdpa" else _value_matmul(gm, site.node)
    axes = ["batch", "heads", "tokens", "dim"]
    while True:
        node = _only_user(node)
        if _is(node, "call_method", {"permute"}):
            axes = [axes[d] for d in _permute_dims(node)]
        elif _is(node, "call_method", {"transpose"}) or _is(node, "call_function", {torch.transpose}):
            a, b = (d % 4 for d in node.args[1:3])
            axes[a], axes[b] = axes[b], axes[a]
        elif _is(node, "call_method", VIEWS | FLATTEN) or _is(node, "call_function", {torch.reshape, torch.flatten}):
            break
        elif not _passes(gm, node):
            raise Unsupported(f"passes its attention output through {node.name} before merging the heads")
    merge = node
    if axes[-2:] != ["heads", "dim"]:
        raise Unsupported(f"merges its heads at {merge.name} in another order than (heads, head dim)")
    if merge.target in ("flatten", torch.flatten):
        start = merge.args[1] if len(merge.args) > 1 else merge.kwargs.get("start_dim", 0)
        end = merge.args[2] if len(merge.args) > 2 else merge.kwargs.get("end_dim", -1)
        if (start % 4, end % 4) != (2, 3):
            raise Unsupported(f"flattens at {merge.name} other than the (heads, head dim) axes")
    elif len(_shape_args(merge)) != 3:
        raise Unsupported(f"merges its heads at {merge.name} into {len(_shape_args(merge))} axes, not (batch, "
                          "tokens, width)")
    node = _only_user(merge)
    while _passes(gm, node):
        node = _only_user(node)
    output = _linear(gm, node, "the merged heads")
    if _module(gm, output).in_features != site.width:
        raise Unsupported(f"reads the merged heads with {output.target}, which takes "
                          f"{_module(gm, output).in_features} features, not the attention width {site.width}")
    return merge, output


def projections(gm: fx.GraphModule, site: Site) -> Projections:
    """The Linear calls keep-head-dim must widen around `site`, or Unsupported naming what is missing."""
    if site.kind == "mha":
        raise Unsupported(f"is an nn.MultiheadAttention ({site.node.target}), which cannot hold a head dim other "
                          "than embed_dim / num_heads")
    for split in site.splits:
        last = len(_shape_args(split.view)) - 1
        if split.ndim != 4 or split.head_pos != last - 1 or split.dim_pos != last:
            raise Unsupported(f"splits heads at {split.view.name} other than the last axis into (heads, head dim) "
                              "for a (batch, heads, tokens, head dim) attention, so reshape cannot tell which "
                              "rows each head owns")
    inputs, pieces = _inputs(gm, site)
    merge, output = _merge(gm, site)
    return Projections(inputs, pieces, merge, output)


def _widen_linears(gm: fx.GraphModule, found: Projections, shape: Shape, new: Shape) -> None:
    """Replace the projections by wider nn.Linear modules, filled by transfer.py's Net2Net rule."""
    names = [node.target for node, _ in found.inputs] + [found.output.target]
    old = {name: gm.get_submodule(name) for name in names}
    layer = {f"{name}.{key}": t.detach() for name in names for key, t in old[name].named_parameters()}
    weights = BlockWeights(attn_in=tuple(Proj(node.target, roles) for node, roles in found.inputs),
                           attn_out=Proj(found.output.target), mlp_in=(), mlp_out=Proj(""))
    transfer.widen_heads(layer, weights, shape, new)
    for name in names:
        weight, bias = layer[f"{name}.weight"], layer.get(f"{name}.bias")
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.clone(), old[name].weight.requires_grad)
        if bias is not None:
            linear.bias = nn.Parameter(bias.clone(), old[name].bias.requires_grad)
        parent, _, attr = name.rpartition(".")
        setattr(gm.get_submodule(parent), attr, linear)


def _set_constant(gm, view: fx.Node, pos: int, value: int) -> None:
    """Set a shape argument (a -1 stays: it follows the others); the size arithmetic that computed it
    before is erased when nothing else reads it, so the generated code reads plainly."""
    old = _shape_args(view)[pos]
    if old == -1:
        return
    _set_shape_arg(view, pos, value)
    while isinstance(old, fx.Node) and not old.users and (
            _is(old, "call_function", {operator.floordiv, operator.mul, operator.getitem, getattr})
            or _is(old, "call_method", {"size"})):
        read = old.args[0]  # x // n, sizes[i], x.shape, x.size(): the first argument is what it read
        gm.graph.erase_node(old)
        old = read


def widen_heads(gm: fx.GraphModule, sites: list[Site], heads: int) -> fx.GraphModule:
    """Keep-head-dim: every located attention gets `heads` heads of its own head dim. Each new head
    copies a source head's Q/K/V rows (K/V stay as they are under grouped-query attention) and the
    output columns of a head copied c times are divided by c, so the block computes what it did. The
    head splits, split sizes and the merge follow the new width; softmax scales stay (the head dim
    does). The plan has checked the head count."""
    found = [projections(gm, site) for site in sites]  # everything is found before anything changes
    for site, proj in zip(sites, found):
        shape = Shape(layers=1, heads=site.heads, kv_heads=site.kv_heads, head_dim=site.head_dim,
                      hidden=site.width, mlp=0)
        new = target_shape(shape, Plan(heads, keep=(0,), head_mode="keep-head-dim"))
        _widen_linears(gm, proj, shape, new)
        if site.biases:  # each new head copies a source head's projections, and takes its bias too
            _inherit_biases(gm, site, head_sources(shape, new.heads))
        for split, role in zip(site.splits, "qkv"):  # a fused view is set three times, to the same values
            # Constants replace whatever computed them (e.g. `C // n_head`, C the model width): the
            # weights now fix the head count and the head dim.
            _set_constant(gm, split.view, split.head_pos, new.heads if role == "q" else new.kv_heads)
            _set_constant(gm, split.view, split.dim_pos, site.head_dim)
        if proj.pieces is not None and proj.pieces.target == "split":
            sizes = [new.role_widths[r] for r in proj.inputs[0][1]]
            size = sizes[0] if isinstance(proj.pieces.args[1], int) else sizes  # an int: three equal pieces
            proj.pieces.args = (proj.pieces.args[0], size, *proj.pieces.args[2:])
        if proj.merge.target not in ("flatten", torch.flatten):
            _set_constant(gm, proj.merge, 2, new.attn_width)
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
