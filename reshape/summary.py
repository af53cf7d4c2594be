"""Parameter accounting and the CLI's tables: the side-by-side shapes `inspect` and `convert` print, the
preset list and the files `push` sends (the report's table lives with its Markdown twin in reporting.py).

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


def presets_table(found: dict) -> Table:
    """`reshape presets`: one row per alias. Columns fold rather than truncate, so narrow terminals keep
    every alias whole."""
    t = Table(title="reshape presets (presets/*.yaml)")
    for column in ("alias", "hub id", "family", "heads", "depth", "offline", "recommendation from"):
        t.add_column(column, overflow="fold")
    for alias, p in found.items():
        offline = "installed" if p.local_folder() else (p.offline_package or "-")
        t.add_row(alias, p.hub_id, p.family, str(p.heads), str(p.depth), offline, p.source)
    return t


def push_table(out, repo: str, result: dict) -> Table:
    """`reshape push`: the files that go (or would go) to the repo, with their sizes."""
    t = Table(title=f"{out} -> {repo} ({result['revision']})")
    t.add_column("file")
    t.add_column("bytes", justify="right")
    for file in result["files"]:
        t.add_row(file["path"], f"{file['size']:,}")
    return t
