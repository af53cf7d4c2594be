"""Learned biases added to the attention scores (relative position tables, LeViT's attention biases) hold
one value per source head: every new head adds its parent head's."""

from __future__ import annotations

import torch
import torch.fx as fx

from .locate import Site


def per_head(bias: torch.Tensor, heads: int, parents: list[int]) -> torch.Tensor:
    """A score bias for the new heads: each takes its parent head's values (`parents[j]`: the source head
    of new head j). The heads axis is -3, as in the (batch, heads, queries, keys) scores; a bias without
    one (size 1 there, or fewer axes) is shared by every head and stays."""
    if bias.dim() < 3 or bias.size(-3) != heads or heads == 1:
        return bias
    return bias.index_select(-3, torch.tensor(parents, device=bias.device))


def inherit_biases(gm: fx.GraphModule, site: Site, parents: list[int]) -> None:
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
