"""The fx path in memory: trace, plan, drop blocks, re-head (keep-width or keep-head-dim).
Deterministic, so `load` can replay it."""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch.fx as fx
from torch import nn

from ..errors import fail
from ..plan import MIN_HEAD_DIM, Plan, Shape, make_plan
from ..summary import count_params
from .depth import keep_blocks
from .biases import check_biases
from .graph import Unsupported
from .keep_width import reshape_heads
from .locate import Site, check_heads, locate
from .widen import projections, widen_graph_heads
from .stack import Stack, block_nodes, find_stack
from .tracer import default_concrete_args, trace

# What the fx path cannot do, with the fix: option -> (refused value test, reason, fix).
REFUSED = {
    "mlp": (lambda v: v is not None, "is not available on the fx path (it cannot tell MLP layers apart)",
            "leave --mlp out"),
    "init": (lambda v: v not in (None, "transfer"), "is not available on the fx path, which keeps the "
             "source's weights", "use --init transfer"),
    "inner_heads": (lambda v: v is not None, "is for TNT's inner attention, which the fx path does not "
                    "locate", "leave --inner-heads out"),
    "head_split": (lambda v: v not in (None, "contiguous"), "is not available on the fx path, which reads "
                   "the same weights as more heads (contiguous)", "use --head-split contiguous or leave it out"),
}
KNOWN = ("keep", "select", "keep_head_dim", "allow_fewer_heads", "force", *REFUSED)


def check_options(options: dict) -> None:
    unknown = set(options) - set(KNOWN)
    if unknown:
        raise TypeError(f"unknown fx options: {', '.join(sorted(unknown))} (known: {', '.join(KNOWN)})")
    for key, (refused, reason, fix) in REFUSED.items():
        if refused(options.get(key)):
            raise fail(key, options[key], reason, fix)


def _has_node(value) -> bool:
    """Is this call argument computed in the graph (a Node, or a tuple of them, e.g. PVT v2's feat_size)?"""
    found = []
    fx.node.map_arg(value, found.append)
    return bool(found)


def trace_block(gm: fx.GraphModule, node: fx.Node, leaf_modules=(), rewire: bool = True) -> fx.GraphModule:
    """Trace one block as it is called in `gm`: constant arguments at the call site (masks left out,
    flags) are fixed. With `rewire`, the call then passes every argument positionally, as the block
    graph takes them."""
    block = gm.get_submodule(node.target)
    sig = inspect.signature(block.forward)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
        raise fail("model", node.target, f"{type(block).__name__}.forward takes *args or **kwargs, which fx "
                   "cannot re-trace at its call site", "give its forward named arguments, or leave heads out")
    bound = sig.bind(*node.args, **node.kwargs)
    concrete = {**default_concrete_args(block),
                **{k: v for k, v in bound.arguments.items() if not _has_node(v)}}
    concrete = {k: v for k, v in concrete.items() if not _has_node(bound.arguments.get(k))}
    block_gm = trace(block, leaf_modules=leaf_modules, concrete_args=concrete, name=node.target)
    if rewire:
        node.args = tuple(bound.arguments.get(p.name, p.default) for p in sig.parameters.values())
        node.kwargs = {}
    return block_gm


def find_attention(gm: fx.GraphModule, stack: Stack, leaf_modules=()) -> Site | str:
    """The attention of the first block, or why it was not found."""
    node = block_nodes(gm, stack)[0]
    block_gm = trace_block(gm, node, leaf_modules, rewire=False)
    try:
        sites = locate(block_gm)
    except Unsupported as e:
        return f"its attention {e}"
    if not sites:
        return ("no attention was found in it (looked for nn.MultiheadAttention, F.scaled_dot_product_attention "
                "and matmul -> softmax -> matmul)")
    return check_heads(sites, node.target)


def check_widening(site: Site, block: str) -> None:
    """Keep-head-dim needs every attention's projections; look for them in the first block's graph (the
    one `find_attention` traced; the blocks are identical) so a refusal comes before anything is written."""
    block_gm = site.node.graph.owning_module
    try:
        for each in locate(block_gm):
            projections(block_gm, each)
    except Unsupported as e:
        raise fail("keep_head_dim", True, f"cannot widen block {block}: its attention {e}",
                   "drop --keep-head-dim to keep the width") from None


def source_shape(stack: Stack, site: Site | None) -> Shape:
    """The plan's view of the model. The fx path cannot tell the model and MLP widths, so hidden is the
    attention width and mlp is 0; an attention that was not found reads as 0 heads."""
    if site is None:
        return Shape(layers=len(stack.names), heads=0, kv_heads=0, head_dim=0, hidden=0, mlp=0)
    return Shape(layers=len(stack.names), heads=site.heads, kv_heads=site.kv_heads, head_dim=site.head_dim,
                 hidden=site.width, mlp=0)


@dataclass
class Planned:
    """A validated plan, with the source traced for it: `gm` calls the source's own block modules."""

    plan: Plan
    shape: Shape  # the source's
    gm: fx.GraphModule
    stack: Stack


def plan_fx(model: nn.Module, heads: int | None, depth: int | None, leaf_modules=(), name: str = "",
            **options) -> Planned:
    """Validate a request against the traced model."""
    check_options(options)
    gm, stack = find_stack(model, leaf_modules, name)
    try:
        found = find_attention(gm, stack, leaf_modules)
    except Exception:
        if heads is not None:
            raise
        found = "it could not be traced"  # depth alone never looks inside a block
    site = found if isinstance(found, Site) else None
    if site is None and heads is not None:
        raise fail("heads", heads, f"cannot be set: in block {stack.names[0]}, {found}",
                   "leave heads out to change the depth only")
    shape = source_shape(stack, site)
    # Without a located attention, the plan checks the layers only (a stand-in head shape).
    planned = shape if site else Shape(shape.layers, 1, 1, MIN_HEAD_DIM, MIN_HEAD_DIM, 0)
    plan = make_plan(planned, family="fx", heads=heads, depth=depth, keep=options.get("keep"),
                     select=options.get("select", "uniform"), keep_head_dim=bool(options.get("keep_head_dim")),
                     allow_fewer_heads=options.get("allow_fewer_heads", False),
                     force=options.get("force", False), can_split_aware=False)
    if site is not None and plan.head_mode == "keep-head-dim" and plan.heads != site.heads:
        check_widening(site, stack.names[0])
    if site is not None and (why := check_biases(site, plan.heads, plan.head_mode == "keep-head-dim")):
        raise fail("heads", heads, f"cannot be set: in block {stack.names[0]}, its attention {why}",
                   f"use a multiple of {site.heads}, or --keep-head-dim")
    if site is None:
        plan = replace(plan, heads=0)  # unknown, and left as it is
    return Planned(plan, shape, gm, stack)


def apply_plan(model: nn.Module, plan: Plan, source_heads: int, leaf_modules=(), traced=None) -> fx.GraphModule:
    """Rewrite `model` by the plan, leaving it untouched: a GraphModule whose blocks are the kept ones,
    renumbered, each re-headed (as its own GraphModule) when the plan's head count differs from
    `source_heads`: at the same width, or with wider projections when the plan keeps the head dim.
    `traced`: the (gm, stack) that `find_stack` made of `model`, reused instead of tracing again."""
    gm, stack = traced or find_stack(model, leaf_modules)
    gm, stack = keep_blocks(gm, stack, plan.keep)  # rewires the graph and its own containers only
    _own_copies(gm)  # the kept modules are still the source's: copy them before re-heading
    if plan.heads and plan.heads != source_heads:
        rehead = widen_graph_heads if plan.head_mode == "keep-head-dim" else reshape_heads
        for node in block_nodes(gm, stack):
            block_gm = trace_block(gm, node, leaf_modules)
            rehead(block_gm, locate(block_gm), plan.heads)
            container, _, index = node.target.rpartition(".")
            setattr(gm.get_submodule(container) if container else gm, index, block_gm)
        gm.graph.lint()
        gm.recompile()
    gm.meta["reshape"] = {"plan": plan.to_dict(), "stack": stack.container, "blocks": list(stack.names)}
    return gm.train(model.training)


def _own_copies(gm: fx.GraphModule) -> None:
    """Replace gm's modules, parameters and buffers by copies, in one deepcopy so tied weights stay tied.
    Cheaper than deep-copying gm, which would copy and recompile its graph too."""
    children, parameters, buffers = copy.deepcopy((dict(gm.named_children()), dict(gm._parameters),
                                                   dict(gm._buffers)))
    for name, child in children.items():
        setattr(gm, name, child)
    gm._parameters.update(parameters)
    gm._buffers.update(buffers)


def params(model: nn.Module) -> dict[str, int]:
    """Parameter counts; embeddings are the nn.Embedding tables (tied weights counted once)."""
    embeddings = SimpleNamespace(embedding_modules=lambda m: [x for x in m.modules() if isinstance(x, nn.Embedding)])
    return count_params(model, embeddings)


def leaner(model: nn.Module, heads: int | None = None, depth: int | None = None, *, leaf_modules=(),
           **options) -> fx.GraphModule:
    """The fx path of `reshape.leaner`: a GraphModule with `depth` of the model's repeated blocks and
    `heads` attention heads, at the same width or, with keep_head_dim=True, of the same head dim
    (function preserving); `model` is untouched."""
    planned = plan_fx(model, heads, depth, leaf_modules, **options)
    return apply_plan(model, planned.plan, planned.shape.heads, leaf_modules, traced=(planned.gm, planned.stack))
