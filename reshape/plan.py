"""The rewrite plan: which heads, which layers, which widths — validated before anything is touched."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import Problem, ReshapeError

HEAD_MODES = ("keep-width", "keep-head-dim")
STRATEGIES = ("uniform", "first", "last")
INITS = ("transfer", "random")
HEAD_SPLITS = ("aware", "contiguous")
MIN_HEAD_DIM = 8  # below this a head can hardly hold a query/key subspace; --force overrides


@dataclass(frozen=True)
class Shape:
    """The numbers that describe a transformer's block stack."""

    layers: int
    heads: int
    kv_heads: int  # equal to heads without grouped-query attention
    head_dim: int
    hidden: int
    mlp: int

    @property
    def attn_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def role_widths(self) -> dict[str, int]:
        """Output features of the query, key and value projections."""
        kv = self.kv_heads * self.head_dim
        return {"q": self.attn_width, "k": kv, "v": kv}

    @property
    def grouped(self) -> bool:
        return self.kv_heads != self.heads

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    """A resolved, valid plan. Build it with `make_plan`."""

    heads: int
    keep: tuple[int, ...]  # source indices of the layers that stay, increasing
    head_mode: str = "keep-width"
    mlp: int | None = None  # new MLP width; None keeps it
    init: str = "transfer"
    head_split: str = "contiguous"  # how keep-width splits each head: see reshape/headsplit.py
    inner_heads: int | None = None  # heads of a family's inner attention (TNT's pixel attention); None keeps them

    @property
    def depth(self) -> int:
        return len(self.keep)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["keep"] = list(self.keep)
        d["depth"] = self.depth
        return d


def select_layers(layers: int, depth: int, strategy: str) -> tuple[int, ...]:
    """Indices of `depth` layers out of `layers` by a named strategy."""
    if strategy == "first":
        return tuple(range(depth))
    if strategy == "last":
        return tuple(range(layers - depth, layers))
    # uniform: evenly spaced with first and last kept (DistilBERT-style). Spacing is >= 1, so
    # rounding half up never repeats an index.
    if depth == 1:
        return (0,)
    step = (layers - 1) / (depth - 1)
    return tuple(math.floor(i * step + 0.5) for i in range(depth))


def target_shape(shape: Shape, plan: Plan) -> Shape:
    """The shape the plan produces."""
    if plan.head_mode == "keep-width":
        head_dim = shape.attn_width // plan.heads
        # The K/V projections keep their shape too, so they are read as proportionally more heads.
        kv_heads = shape.kv_heads * plan.heads // shape.heads
    else:
        head_dim = shape.head_dim
        kv_heads = plan.heads if not shape.grouped else shape.kv_heads
    return Shape(
        layers=plan.depth,
        heads=plan.heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        hidden=shape.hidden,
        mlp=plan.mlp or shape.mlp,
    )


def head_sources(shape: Shape, new_heads: int) -> list[int]:
    """For each new head, the source head it copies, spread evenly. With KV groups, each new query
    head copies a source head of its own group, so it keeps attending with the same K/V."""
    groups = shape.kv_heads if shape.grouped else 1
    old_per_group = shape.heads // groups
    new_per_group = new_heads // groups
    return [
        (j // new_per_group) * old_per_group + (j % new_per_group) * old_per_group // new_per_group
        for j in range(new_heads)
    ]


def parent_heads(shape: Shape, plan: Plan) -> list[int]:
    """For each new head, the source head it comes from: the copied head when the head dim is kept,
    else the source head that holds the new head's first channel."""
    if plan.head_mode == "keep-head-dim":
        return head_sources(shape, plan.heads)
    new_dim = shape.attn_width // plan.heads
    return [j * new_dim // shape.head_dim for j in range(plan.heads)]


def legal_heads(shape: Shape, keep_head_dim: bool) -> list[int]:
    """Head counts the plan accepts for this shape, ignoring the minimum head dim: up to a head dim
    of MIN_HEAD_DIM at the same width, or up to 4x the heads when the width grows."""
    limit = 4 * shape.heads if keep_head_dim else shape.attn_width // MIN_HEAD_DIM
    return [h for h in range(1, limit + 1) if not _head_problem(shape, h, keep_head_dim)]


def _head_problem(shape: Shape, heads: int, keep_head_dim: bool) -> str | None:
    if keep_head_dim:
        if shape.grouped and heads % shape.kv_heads:
            return f"is not a multiple of the {shape.kv_heads} KV heads (each query head must stay in a KV group)"
        return None
    if shape.attn_width % heads:
        return f"does not divide the attention width {shape.attn_width}"
    if (shape.kv_heads * heads) % shape.heads:
        return (
            f"would need {shape.kv_heads}x{heads}/{shape.heads} KV heads, not a whole number "
            "(the KV projections keep their width)"
        )
    return None


def make_plan(
    shape: Shape,
    *,
    family: str,
    heads: int | None = None,
    depth: int | None = None,
    keep: list[int] | tuple[int, ...] | None = None,
    select: str = "uniform",
    keep_head_dim: bool = False,
    mlp: int | None = None,
    init: str = "transfer",
    allow_fewer_heads: bool = False,
    force: bool = False,
    can_widen_attention: bool = True,
    head_split: str | None = None,
    can_split_aware: bool = True,
    inner_heads: int | None = None,
    inner: Shape | None = None,
) -> Plan:
    """Validate a request against a model's shape; raise one ReshapeError listing every problem."""
    problems: list[Problem] = []

    def bad(field, value, reason, fix):
        problems.append(Problem(field, value, reason, fix))

    heads = shape.heads if heads is None else heads
    head_mode = "keep-head-dim" if keep_head_dim else "keep-width"
    if keep_head_dim and not can_widen_attention:
        bad(
            "head_mode", head_mode,
            f"a {family} config cannot express an attention width different from the model width, "
            "so the result would need reshape to load",
            "drop --keep-head-dim to use the default keep-width mode",
        )
    if heads < 1:
        bad("heads", heads, "must be at least 1", f"use a head count such as {2 * shape.heads}")
    else:
        reason = _head_problem(shape, heads, keep_head_dim)
        if reason:
            legal = [h for h in legal_heads(shape, keep_head_dim)
                     if (h >= shape.heads or allow_fewer_heads)
                     and (keep_head_dim or force or shape.attn_width // h >= MIN_HEAD_DIM)]
            bad("heads", heads, reason, f"use one of {', '.join(map(str, legal))}")
        elif heads < shape.heads and keep_head_dim:
            bad("heads", heads, f"is fewer than the model's {shape.heads}, and keep-head-dim only adds heads",
                "drop --keep-head-dim to merge heads at the same width")
        elif heads < shape.heads and not allow_fewer_heads:
            bad("heads", heads, f"is fewer than the model's {shape.heads} (reshape adds heads)",
                "pass --allow-fewer-heads to merge heads")
        else:
            head_dim = shape.head_dim if keep_head_dim else shape.attn_width // heads
            if head_dim < MIN_HEAD_DIM and not force:
                bad("heads", heads, f"gives head dim {head_dim}, below the minimum {MIN_HEAD_DIM}",
                    "use fewer heads or pass --force")

    if inner_heads is not None:  # re-read at the same width, like keep-width heads
        if inner is None:
            bad("inner_heads", inner_heads, f"applies to models with an inner attention, and {family} has none",
                "leave --inner-heads out")
        elif inner_heads < 1 or _head_problem(inner, inner_heads, False):
            legal = [h for h in range(1, inner.attn_width + 1)
                     if inner.attn_width % h == 0 and (h >= inner.heads or allow_fewer_heads)]
            bad("inner_heads", inner_heads, f"does not divide the inner attention width {inner.attn_width}",
                f"use one of {', '.join(map(str, legal))}")
        elif inner_heads < inner.heads and not allow_fewer_heads:
            bad("inner_heads", inner_heads, f"is fewer than the model's {inner.heads} inner heads",
                "pass --allow-fewer-heads to merge heads")
        elif inner.attn_width // inner_heads < MIN_HEAD_DIM and not force:
            bad("inner_heads", inner_heads, f"gives inner head dim {inner.attn_width // inner_heads}, below the "
                f"minimum {MIN_HEAD_DIM}", "use fewer inner heads or pass --force")

    keep_t: tuple[int, ...] | None = None
    if keep is not None:
        keep = list(keep)
        out_of_range = [i for i in keep if not 0 <= i < shape.layers]
        duplicated = sorted({i for i in keep if keep.count(i) > 1})
        if not keep:
            bad("keep", "", "lists no layer", f"list layer indices between 0 and {shape.layers - 1}")
        elif out_of_range:
            bad("keep", _csv(keep), f"has indices {_csv(out_of_range)} outside 0..{shape.layers - 1}",
                f"use indices between 0 and {shape.layers - 1}")
        elif duplicated:
            bad("keep", _csv(keep), f"repeats {_csv(duplicated)}", "list each kept layer once")
        elif keep != sorted(keep):
            bad("keep", _csv(keep), "is not in increasing order", f"write it as {_csv(sorted(keep))}")
        elif depth is not None and depth != len(keep):
            bad("keep", _csv(keep), f"lists {len(keep)} layers but depth is {depth}",
                "make --depth match the number of kept layers, or leave --depth out")
        else:
            keep_t = tuple(keep)
    if depth is None:
        depth = len(keep) if keep else shape.layers
    if not 1 <= depth <= shape.layers:
        bad("depth", depth, f"must be between 1 and the model's {shape.layers} layers",
            f"use a depth such as {max(1, math.ceil(2 * shape.layers / 3))}")
    if select not in STRATEGIES:
        bad("select", select, "is not a selection strategy",
            f"use one of {', '.join(STRATEGIES)}, importance (with --calib DATA), or --keep")
    if mlp is not None and not 1 <= mlp <= shape.mlp:
        bad("mlp", mlp, f"must be between 1 and the current MLP width {shape.mlp} (neurons are kept, not added)",
            f"use e.g. {shape.mlp // 2}")
    if init not in INITS:
        bad("init", init, "is not an initialisation", f"use one of {', '.join(INITS)}")
    splits_heads = not keep_head_dim and heads > shape.heads and heads % shape.heads == 0
    if head_split is None:  # the default: aware wherever it applies
        head_split = "aware" if splits_heads and can_split_aware else "contiguous"
    elif head_split not in HEAD_SPLITS:
        bad("head_split", head_split, "is not a head split", f"use one of {', '.join(HEAD_SPLITS)}")
    elif head_split == "aware" and not can_split_aware:
        bad("head_split", head_split, f"is not available for {family} (rotary positions and shared KV heads "
            "tie each key dimension to its frequency and group)", "use --head-split contiguous")
    elif head_split == "aware" and not splits_heads and heads != shape.heads:
        bad("head_split", head_split, f"splits each of the {shape.heads} heads into equal parts, so it needs "
            f"a keep-width plan with a multiple of {shape.heads} heads",
            f"use --heads {2 * shape.heads} or --head-split contiguous")
    if problems:
        raise ReshapeError(problems)

    if keep_t is None:
        keep_t = select_layers(shape.layers, depth, select)
    if not splits_heads:
        head_split = "contiguous"  # nothing is split: the two are the same
    return Plan(heads=heads, keep=keep_t, head_mode=head_mode,
                mlp=None if mlp == shape.mlp else mlp, init=init, head_split=head_split,
                inner_heads=None if inner is None or inner_heads == inner.heads else inner_heads)


def rule_of_thumb(shape: Shape) -> tuple[int, int]:
    """The paper's rough recipe when nothing is asked: double the heads where the width allows
    (keeping head dim >= MIN_HEAD_DIM), and two thirds of the depth rounded up."""
    heads = shape.heads * 2
    if _head_problem(shape, heads, False) or shape.attn_width // heads < MIN_HEAD_DIM:
        heads = shape.heads
    return heads, math.ceil(2 * shape.layers / 3)


def _csv(values) -> str:
    return ",".join(str(v) for v in values)

