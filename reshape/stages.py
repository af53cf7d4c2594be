"""Hierarchical models (DaViT, Swin): several block stacks ("stages"), each with its own width, heads and depth.

A staged plan is one ordinary Plan per stage, each validated by `make_plan`; the weight transfer runs
once per stage. `--depth 1,1,5,1` and `--heads 4,8,16,32` give one number per stage; a model with a
single block stack takes plain numbers. `any_plan`, `any_rule_of_thumb` and `result_shape` serve both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from .errors import Problem, ReshapeError, fail
from .plan import Plan, Shape, make_plan, rule_of_thumb, target_shape

PER_STAGE = ("heads", "depth")  # the plan fields given as one number per stage


@dataclass(frozen=True)
class StagedShape:
    stages: tuple[Shape, ...]

    def to_dict(self) -> dict:
        """Each Shape field as a list with one value per stage (what the table prints)."""
        return {f.name: [getattr(s, f.name) for s in self.stages] for f in fields(Shape)}


@dataclass(frozen=True)
class StagedPlan:
    stages: tuple[Plan, ...]  # the head mode, MLP, init and head split are the same in every stage

    @property
    def heads(self) -> list[int]:  # lists, as the per-stage numbers are given and saved
        return [p.heads for p in self.stages]

    @property
    def depth(self) -> list[int]:
        return [p.depth for p in self.stages]

    @property
    def keep(self) -> list[list[int]]:
        return [list(p.keep) for p in self.stages]

    @property
    def head_mode(self) -> str:
        return self.stages[0].head_mode

    @property
    def mlp(self) -> int | None:
        return self.stages[0].mlp

    @property
    def init(self) -> str:
        return self.stages[0].init

    @property
    def head_split(self) -> str:
        return self.stages[0].head_split

    @property
    def inner_heads(self) -> int | None:
        return self.stages[0].inner_heads

    def to_dict(self) -> dict:
        return {**asdict(self.stages[0]), "heads": self.heads, "keep": self.keep, "depth": self.depth}


def any_plan(shape: Shape | StagedShape, *, family: str, heads=None, depth=None, keep=None,
             **options) -> Plan | StagedPlan:
    """`make_plan` for one block stack, or one per stage for a hierarchical model; heads and depth
    are numbers, or lists with one number per stage."""
    if isinstance(shape, StagedShape):
        return _staged_plan(shape, family=family, heads=heads, depth=depth, keep=keep, **options)
    problems = [Problem(field, _csv(value), f"gives one number per stage, and {family} has a single block stack",
                        f"give one number, e.g. --{field} {value[-1]}")
                for field, value in (("heads", heads), ("depth", depth)) if isinstance(value, (list, tuple))]
    if problems:
        raise ReshapeError(problems)
    return make_plan(shape, family=family, heads=heads, depth=depth, keep=keep, **options)


def any_rule_of_thumb(shape: Shape | StagedShape):
    """The paper's rule of thumb. For stages: double each stage's heads where the width allows, and cut
    only the longest stage, to two thirds (the paper cuts DaViT's [1, 1, 9, 1] to [1, 1, 5, 1])."""
    if not isinstance(shape, StagedShape):
        return rule_of_thumb(shape)
    heads = [rule_of_thumb(s)[0] for s in shape.stages]
    return heads, _cut_longest([s.layers for s in shape.stages])


def result_shape(shape: Shape | StagedShape, plan: Plan | StagedPlan) -> Shape | StagedShape:
    if isinstance(shape, StagedShape):
        return StagedShape(tuple(map(target_shape, shape.stages, plan.stages)))
    return target_shape(shape, plan)


def _staged_plan(shape: StagedShape, *, family: str, heads, depth, keep, **options) -> StagedPlan:
    n = len(shape.stages)
    current = {"heads": [s.heads for s in shape.stages], "depth": [s.layers for s in shape.stages]}
    example = {"heads": any_rule_of_thumb(shape)[0], "depth": any_rule_of_thumb(shape)[1]}
    asked = {"heads": heads, "depth": depth}
    problems = []
    for field in PER_STAGE:
        value = asked[field]
        if value is None:
            asked[field] = current[field]
        elif not isinstance(value, (list, tuple)) or len(value) != n:
            count = f"has {len(value)} values" if isinstance(value, (list, tuple)) else "is a single number"
            problems.append(Problem(field, _csv(value), f"{count}, and {family} has {n} stages ({field} "
                                    f"{_csv(current[field])})", f"give one per stage, e.g. --{field} "
                                    f"{_csv(example[field])}"))
    if keep is not None:
        problems.append(Problem("keep", _csv(keep), f"lists the layers of one block stack, and {family} has "
                                f"{n} stages", f"give one depth per stage instead, e.g. --depth {_csv(example['depth'])}"))
    if problems:
        raise ReshapeError(problems)
    plans = []
    for i, stage in enumerate(shape.stages):
        try:
            plans.append(make_plan(stage, family=family, heads=asked["heads"][i], depth=asked["depth"][i], **options))
        except ReshapeError as e:  # name the stage of per-stage numbers; shared options are reported once
            problems += [replace(p, field=f"{p.field}[stage {i}]") if p.field in PER_STAGE else p
                         for p in e.problems]
    if problems:
        raise ReshapeError(list(dict.fromkeys(problems)))
    return StagedPlan(tuple(plans))


def _cut_longest(depths: list[int]) -> list[int]:
    longest = depths.index(max(depths))
    return [math.ceil(2 * d / 3) if i == longest else d for i, d in enumerate(depths)]


def _csv(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def refuse_stages(family, field: str, value, command: str) -> None:
    """`report` and `distill` follow one block stack; a model with several stages is refused by name."""
    if family.staged:
        raise fail(field, value, f"is a {family.name} model with several stages, and reshape {command} follows "
                   "one block stack", "use reshape inspect, convert and finetune for it")
