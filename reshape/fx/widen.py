"""Keep-head-dim re-heading: more heads of the same head dim, so the attention width grows.

`projections` pins down the Linear(s) whose rows the head split reads (one fused Linear viewed as
(..., 3, heads, head dim) or split/chunked into q, k, v, or three Linears) and the Linear that reads the
merged heads; `widen_graph_heads` replaces them by wider nn.Linear modules filled by transfer.py's Net2Net rule,
so the block computes exactly what it did.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .. import transfer
from ..families import BlockWeights, Proj
from ..plan import Plan, Shape, head_sources, target_shape
from .biases import inherit_biases
from .graph import (FLATTEN, VIEWS, Unsupported, is_op, module_of, only_user, passes_through, permute_dims,
                    set_shape_arg, shape_args)
from .locate import Site, value_matmul


@dataclass
class Projections:
    """The nn.Linear calls around one attention, which keep-head-dim widens."""

    inputs: list[tuple[fx.Node, tuple[str, ...]]]  # (Linear call, the roles q/k/v of its output rows in order)
    pieces: fx.Node | None  # the split/chunk of one fused Linear into q, k and v, if any
    merge: fx.Node  # the view/reshape/flatten that merges the heads back
    output: fx.Node  # the Linear call that reads the merged heads


def _linear(gm, node, what: str) -> fx.Node:
    """`node` must be the only call of a plain nn.Linear, whose shape is about to change."""
    if type(module_of(gm, node)) is not nn.Linear:
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
        if shape_args(view)[-3] != 3 or module_of(gm, linear).out_features != 3 * site.width:
            raise Unsupported(f"splits {linear.target}'s outputs at {view.name} other than as (..., 3, heads, "
                              "head dim), so reshape cannot tell which rows each head owns")
        only_user(linear)
        return [(linear, ("q", "k", "v"))], None
    sources = [v.args[0] for v in views]
    if all(is_op(x, "call_function", {operator.getitem}) for x in sources):  # nanoGPT: .split / .chunk
        pieces, indices = sources[0].args[0], [x.args[1] for x in sources]
        if (any(x.args[0] is not pieces for x in sources) or not all(isinstance(i, int) for i in indices)
                or sorted(indices) != [0, 1, 2] or len(pieces.users) != 3
                or not is_op(pieces, "call_method", {"split", "chunk"})):
            raise Unsupported(f"splits the queries, keys and values at {pieces.name} other than into exactly "
                              "q, k and v by .split(width) or .chunk(3)")
        for x, view in zip(sources, views):
            if only_user(x) is not view:
                raise Unsupported(f"uses {x.name} besides splitting it into heads")
        roles = tuple(role for _, role in sorted(zip(indices, "qkv")))  # in the Linear's output order
        sizes = [width[r] for r in roles]
        linear = _linear(gm, pieces.args[0], what)
        arg = pieces.args[1] if len(pieces.args) > 1 else None  # split(W), split([Wq, Wk, Wv]) or chunk(3)
        if pieces.target == "chunk":
            declared = [module_of(gm, linear).out_features // 3] * 3 if arg == 3 else None
        else:
            declared = [arg] * 3 if isinstance(arg, int) else list(arg) if isinstance(arg, (list, tuple)) else None
        dim = pieces.args[2] if len(pieces.args) > 2 else pieces.kwargs.get("dim", 0)
        feature_dim = len(shape_args(views[0])) - 2  # the view splits the Linear's last axis into heads
        if (declared != sizes or sum(sizes) != module_of(gm, linear).out_features
                or dim not in (-1, feature_dim)):
            raise Unsupported(f"splits {linear.target}'s outputs at {pieces.name} other than into q, k and v "
                              f"of widths {', '.join(map(str, sizes))} along the last axis")
        only_user(linear)
        return [(linear, roles)], pieces
    if len(set(sources)) == 3:  # one Linear each
        for x, role in zip(sources, "qkv"):
            _linear(gm, x, what)
            only_user(x)
            if module_of(gm, x).out_features != width[role]:
                raise Unsupported(f"splits {x.target}'s {module_of(gm, x).out_features} outputs into {role} heads "
                                  f"of width {width[role]}")
        return [(x, (role,)) for x, role in zip(sources, "qkv")], None
    raise Unsupported(f"reads the queries, keys and values ({', '.join(v.name for v in views)}) neither from one "
                      "fused nn.Linear nor from three")


def _merge(gm, site: Site) -> tuple[fx.Node, fx.Node]:
    """From the attention output (batch, heads, tokens, head dim) forward to the view that merges the
    heads and the Linear that reads it; its input columns must be head-major, as the rows were."""
    node = site.node if site.kind == "sdpa" else value_matmul(gm, site.node)
    axes = ["batch", "heads", "tokens", "dim"]
    while True:
        node = only_user(node)
        if is_op(node, "call_method", {"permute"}):
            axes = [axes[d] for d in permute_dims(node)]
        elif is_op(node, "call_method", {"transpose"}) or is_op(node, "call_function", {torch.transpose}):
            a, b = (d % 4 for d in node.args[1:3])
            axes[a], axes[b] = axes[b], axes[a]
        elif (is_op(node, "call_method", VIEWS | FLATTEN)
              or is_op(node, "call_function", {torch.reshape, torch.flatten})):
            break
        elif not passes_through(gm, node):
            raise Unsupported(f"passes its attention output through {node.name} before merging the heads")
    merge = node
    if axes[-2:] != ["heads", "dim"]:
        raise Unsupported(f"merges its heads at {merge.name} in another order than (heads, head dim)")
    if merge.target in ("flatten", torch.flatten):
        start = merge.args[1] if len(merge.args) > 1 else merge.kwargs.get("start_dim", 0)
        end = merge.args[2] if len(merge.args) > 2 else merge.kwargs.get("end_dim", -1)
        if (start % 4, end % 4) != (2, 3):
            raise Unsupported(f"flattens at {merge.name} other than the (heads, head dim) axes")
    elif len(shape_args(merge)) != 3:
        raise Unsupported(f"merges its heads at {merge.name} into {len(shape_args(merge))} axes, not (batch, "
                          "tokens, width)")
    node = only_user(merge)
    while passes_through(gm, node):
        node = only_user(node)
    output = _linear(gm, node, "the merged heads")
    if module_of(gm, output).in_features != site.width:
        raise Unsupported(f"reads the merged heads with {output.target}, which takes "
                          f"{module_of(gm, output).in_features} features, not the attention width {site.width}")
    return merge, output


def projections(gm: fx.GraphModule, site: Site) -> Projections:
    """The Linear calls keep-head-dim must widen around `site`, or Unsupported naming what is missing."""
    if site.kind == "mha":
        raise Unsupported(f"is an nn.MultiheadAttention ({site.node.target}), which cannot hold a head dim other "
                          "than embed_dim / num_heads")
    for split in site.splits:
        last = len(shape_args(split.view)) - 1
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
    old = shape_args(view)[pos]
    if old == -1:
        return
    set_shape_arg(view, pos, value)
    while isinstance(old, fx.Node) and not old.users and (
            is_op(old, "call_function", {operator.floordiv, operator.mul, operator.getitem, getattr})
            or is_op(old, "call_method", {"size"})):
        read = old.args[0]  # x // n, sizes[i], x.shape, x.size(): the first argument is what it read
        gm.graph.erase_node(old)
        old = read


def widen_graph_heads(gm: fx.GraphModule, sites: list[Site], heads: int) -> fx.GraphModule:
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
            inherit_biases(gm, site, head_sources(shape, new.heads))
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
