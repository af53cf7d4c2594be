"""Parameter accounting and the side-by-side table that `inspect` and `convert` print.

Imports neither torch nor the families (`reshape inspect` of a known config prints its table without them):
count_params takes the model and its family from its caller."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from .plan import Shape

if TYPE_CHECKING:
    from torch import nn

    from .families import Family


def count_params(model: nn.Module, family: Family) -> dict[str, int]:
    """Total parameters (tied weights once) and those outside the embeddings. Works on meta models."""
    total = sum(p.numel() for p in model.parameters())
    embedding = {}
    for item in family.embedding_modules(model):  # modules, or loose parameters (tensors have no .parameters)
        for p in item.parameters() if hasattr(item, "parameters") else [item]:
            embedding[id(p)] = p.numel()
    emb = sum(embedding.values())
    return {"total": total, "embeddings": emb, "non_embedding": total - emb}


def describe(shape: Shape, params: dict[str, int]) -> dict:
    return {"shape": shape.to_dict(), "params": params}


ROWS = [
    ("layers", ("shape", "layers")),
    ("heads", ("shape", "heads")),
    ("KV heads", ("shape", "kv_heads")),
    ("head dim", ("shape", "head_dim")),
    ("hidden width", ("shape", "hidden")),
    ("MLP width", ("shape", "mlp")),
    ("parameters", ("params", "total")),
    ("parameters without embeddings", ("params", "non_embedding")),
]


def table(title: str, source: dict, result: dict | None = None) -> Table:
    """A rich table of a model's shape and parameters, and with a result, the change."""
    t = Table(title=title)
    t.add_column("")
    t.add_column("source", justify="right")
    if result:
        t.add_column("result", justify="right")
        t.add_column("change", justify="right")
    for label, (group, key) in ROWS:
        before = source[group][key]
        if not result:
            t.add_row(label, cell(before))
            continue
        after = result[group][key]
        if after == before or isinstance(after, list):  # per-stage lists: the values say it
            change = ""
        elif group == "params":
            change = f"{(after - before) / before:+.1%}"
        else:
            change = f"x{after / before:.3g}"
        t.add_row(label, cell(before), cell(after), change)
    return t


def cell(value) -> str:
    """A number, or one number per stage of a hierarchical model."""
    return ",".join(map(str, value)) if isinstance(value, list) else f"{value:,}"
