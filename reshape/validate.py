"""The range of every number a user gives reshape, and the type of every argument, declared once.

The CLI and the Python API both check here (TrainConfig checks itself when it is made; each command
checks the rest first thing), so a value is refused the same way wherever it comes from, before any
work starts. Counts that depend on the model (heads, depth, keep, MLP width) are checked by the plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import Problem, ReshapeError, fail


COUNT_MAX = 2**63 - 1  # torch and the C code below it take counts as 64-bit integers: larger ones crash there


@dataclass(frozen=True)
class Range:
    low: float
    high: float | None = None  # None: COUNT_MAX for whole numbers, else no limit
    low_open: bool = False  # low itself is refused: lr and temperature must be more than 0
    whole: bool = True  # a count, not a real number
    fix: str = ""

    def problem(self, value) -> str | None:
        """Why `value` is out of range, or None."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"is a {type(value).__name__}, not a {'whole ' if self.whole else ''}number"
        if self.whole and not isinstance(value, int):
            return "must be a whole number"
        if not math.isfinite(value):
            return "must be a finite number"
        if value < self.low or (self.low_open and value == self.low):
            return f"must be more than {self.low}" if self.low_open else f"must be at least {self.low}"
        high = self.high if self.high is not None else COUNT_MAX if self.whole else math.inf
        if value > high:
            return f"must be at most {high}"
        return None


SEED_MAX = 2**32 - 1  # numpy's seeds stop here, and accelerate seeds numpy too

RANGES: dict[str, Range] = {
    # training: the fields of TrainConfig
    "max_steps": Range(1, fix="pass --steps 1 or more, or leave it out to train by epochs"),
    "epochs": Range(0, low_open=True, whole=False, fix="use e.g. --epochs 3, or --steps N"),
    "batch_size": Range(1, fix="use e.g. --batch-size 32"),
    "lr": Range(0, low_open=True, whole=False, fix="use e.g. --lr 5e-5"),
    "weight_decay": Range(0, whole=False, fix="use e.g. 0.01, or 0 for none"),
    "warmup_ratio": Range(0, 1, whole=False, fix="use e.g. 0.06, the fraction of steps spent warming up"),
    "grad_accum": Range(1, fix="use 1 to take an optimizer step after every batch"),
    "max_grad_norm": Range(0, whole=False, fix="use e.g. 1.0, or 0 to clip nothing"),
    "eval_every": Range(1, fix="use e.g. --eval-every 50, or leave it out to evaluate at the end"),
    "min_steps": Range(1, fix="use e.g. 300"),
    "patience": Range(1, fix="use e.g. --patience 5, or leave it out to train the whole budget"),
    "log_every": Range(1, fix="use e.g. 10"),
    "save_every": Range(1, fix="use e.g. 50"),
    "seed": Range(0, SEED_MAX, fix="use e.g. --seed 0"),
    # models and data
    "max_length": Range(1, fix="use e.g. --max-length 128"),
    "lora": Range(1, fix="use e.g. --lora 8, or leave it out to train every weight"),
    # distillation (the loss weights check themselves: DistillWeights)
    "temperature": Range(0, low_open=True, whole=False, fix="use e.g. --temperature 2"),
    "relation_heads": Range(1, fix="use e.g. --relation-heads 12, or leave it out to pick the most that fit"),
    # report
    "batch_sizes": Range(1, fix="use e.g. --batch-sizes 1,32"),
    "seq_len": Range(1, fix="use e.g. --seq-len 128"),
    "repeats": Range(1, fix="use e.g. --repeats 10"),
    # sweep
    "budget": Range(1, fix="use e.g. --budget 200"),
    "seeds": Range(1, fix="use e.g. --seeds 3"),
    "breaks_below": Range(0, 1, low_open=True, whole=False, fix="use e.g. --breaks-below 0.98"),
}


def problems(**values) -> list[Problem]:
    """One problem per out-of-range value; None means "not given" and passes. A list or tuple must be
    non-empty and each of its items in range."""
    found = []
    for field, value in values.items():
        limits = RANGES[field]
        if value is None:
            continue
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        reason = "lists nothing" if not items else next(filter(None, map(limits.problem, items)), None)
        if reason:
            shown = ",".join(map(str, items)) if isinstance(value, (list, tuple)) else value
            found.append(Problem(field, shown, reason, limits.fix))
    return found


def check(**values) -> None:
    """Raise one ReshapeError naming every out-of-range value."""
    found = problems(**values)
    if found:
        raise ReshapeError(found)


def expect(field: str, value, types: type | tuple[type, ...], takes: str, fix: str) -> None:
    """Refuse an argument of the wrong type with a one-line error, not a traceback from deep inside."""
    if not isinstance(value, types):
        shown = repr(value) if isinstance(value, (str, int, float)) else f"<{type(value).__name__}>"
        raise fail(field, shown[:80], f"is of type {type(value).__name__}, not {takes}", fix)


def whole_numbers(**values) -> None:
    """Refuse plan counts (heads, depth, keep, ...) that are neither a whole number nor a list of them; None
    passes. Their ranges depend on the model, which the plan checks; this keeps its arithmetic off strings."""
    for field, value in values.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise fail(field, value, "is not a whole number or a list of whole numbers",
                       f"pass e.g. {field}=8, or one number per stage: {field}=[2, 2, 6, 2]")
