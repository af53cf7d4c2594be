"""Finding the repeated block stack: the longest run of structurally identical blocks in a
ModuleList/Sequential that the top-level graph calls as a chain."""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from ..errors import fail
from .tracer import trace


@dataclass(frozen=True)
class Stack:
    container: str  # qualified name of the ModuleList/Sequential, "" for the root itself
    names: tuple[str, ...]  # qualified names of the blocks, in call order

    @property
    def prefix(self) -> str:
        return f"{self.container}." if self.container else ""


def signature(block: nn.Module) -> tuple:
    """Blocks are identical when their module trees have the same classes and tensor shapes
    (values such as dropout rates may differ)."""
    return tuple(
        (name, type(m).__name__,
         tuple((n, tuple(t.shape)) for n, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]))
        for name, m in block.named_modules()
    )


def candidates(model: nn.Module) -> list[Stack]:
    """Runs of at least two identical consecutive children of any ModuleList/Sequential, longest first
    (ties: the one holding more parameters)."""
    runs = []
    for cname, container in model.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(container.named_children())
        start = 0
        for i in range(1, len(children) + 1):
            if i == len(children) or signature(children[i][1]) != signature(children[start][1]):
                if i - start >= 2:
                    prefix = f"{cname}." if cname else ""
                    names = tuple(prefix + n for n, _ in children[start:i])
                    size = sum(p.numel() for _, c in children[start:i] for p in c.parameters())
                    runs.append((len(names), size, Stack(cname, names)))
                start = i
    runs.sort(key=lambda r: (-r[0], -r[1]))
    return [r[2] for r in runs]


def block_nodes(gm: fx.GraphModule, stack: Stack) -> list[fx.Node] | None:
    """The call nodes of the stack's blocks if they form a chain (each block takes the previous
    block's output as its first argument, each called once), else None."""
    calls = {name: [] for name in stack.names}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in calls:
            calls[node.target].append(node)
    if any(len(c) != 1 for c in calls.values()):
        return None
    nodes = [calls[name][0] for name in stack.names]
    for prev, node in zip(nodes, nodes[1:]):
        if not node.args or node.args[0] is not prev:
            return None
    return nodes


def find_stack(model: nn.Module, leaf_modules=(), name: str = "") -> tuple[fx.GraphModule, Stack]:
    """Trace the model with its blocks as leaves; return the top-level graph and the block stack."""
    tried = []
    for stack in candidates(model):
        gm = trace(model, leaves=stack.names, leaf_modules=leaf_modules, name=name)
        if block_nodes(gm, stack) is not None:
            return gm, stack
        tried.append(f"{stack.container or 'root'} ({len(stack.names)} blocks, not called as a chain)")
    from ..families import FAMILIES

    found = "; ".join(tried) if tried else "no ModuleList or Sequential holds two identical blocks"
    raise fail("model", name or type(model).__name__, "is not a supported model family, and the torch.fx path "
               f"found no repeated block stack on its main path ({found})",
               "keep its blocks in an nn.ModuleList or nn.Sequential called one after another, or use one of: "
               + "; ".join(f.covers for f in FAMILIES))
