"""Dropping blocks: each removed block's output uses are replaced by its input, and the kept blocks
take the run's first L names (0..L-1 when the run is the whole container, so the state dict reads
like a model built with L layers). A run that starts partway through its container (Hiera, MaxViT:
a different first block) keeps its start: names outside the run are never reused, since the graph
still calls those modules."""

from __future__ import annotations

import torch.fx as fx

from .stack import Stack, block_nodes


def keep_blocks(gm: fx.GraphModule, stack: Stack, keep: tuple[int, ...]) -> tuple[fx.GraphModule, Stack]:
    """Keep the blocks at indices `keep` of the stack (increasing); return the graph and the new stack."""
    nodes = block_nodes(gm, stack)
    kept = []
    for index, node in enumerate(nodes):
        if index in keep:
            kept.append((node, gm.get_submodule(node.target)))
        else:  # identity in place of the block: its consumers read what it was given
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    for name in stack.names:
        gm.delete_submodule(name)
    names = []
    for name, (node, module) in zip(stack.names, kept):
        gm.add_submodule(name, module)
        node.target = name
        names.append(name)
    gm.graph.lint()
    gm.recompile()
    return gm, Stack(stack.container, tuple(names))
