"""Keep-width re-heading: the same Q/K/V/O weights read as more, narrower heads. The head splits'
arguments are rewritten and every constant softmax scale is scaled by sqrt(old/new head dim), so
1/sqrt(d) becomes 1/sqrt(d_new) and custom scales keep their ratio to it."""

from __future__ import annotations

import math
import operator
from fractions import Fraction

import torch.fx as fx

from .biases import inherit_biases
from .graph import count_of, set_shape_arg, shape_args
from .locate import Site


def reshape_heads(gm: fx.GraphModule, sites: list[Site], heads: int) -> fx.GraphModule:
    """Keep-width: read every located attention as `heads` heads of width/heads, with the softmax
    scale of the new head dim. The plan has checked that the numbers divide."""
    done = set()
    for site in sites:
        ratio = Fraction(heads, site.heads)  # new heads per old head
        new_dim = Fraction(site.head_dim) / ratio
        if site.biases:  # contiguous split: new head j holds features of old head j // ratio
            inherit_biases(gm, site, [int(j / ratio) for j in range(heads)])
        if site.kind == "mha":
            module = gm.get_submodule(site.node.target)
            module.num_heads, module.head_dim = heads, int(new_dim)
            continue
        for split in site.splits:
            if split.view in done:  # q, k and v often share one fused view
                continue
            done.add(split.view)
            args = shape_args(split.view)
            positions = [split.dim_pos] + ([split.head_pos] if split.head_pos is not None else [0])
            for pos in positions:
                arg, is_dim = args[pos], pos == split.dim_pos
                count = count_of(arg)
                if count is None or count[1] == -1:
                    continue  # run-time size or -1: follows the other argument
                kind, n = count
                # A head dim shrinks by `ratio`, a head count (or the divisor of a head dim) grows by it.
                grows = (kind == "div") == is_dim
                new = n * ratio if grows else n / ratio
                if kind == "const":
                    set_shape_arg(split.view, pos, int(new))
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
