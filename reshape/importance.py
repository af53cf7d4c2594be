"""Layer importance on calibration data, for `--select importance`.

Block Influence (ShortGPT, Men et al. 2024): BI = 1 - cos(block input, block output), averaged over real
tokens. A block that barely turns its input contributes little and is the first to go. Angular distance
(arccos(cos)/pi, Gromov et al. 2024) ranks the same way per token and is offered for reporting.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Iterable

import torch
from torch import nn

from .errors import ReshapeError
from .inputs import whole_model

METRICS = ("block-influence", "angular")


@torch.no_grad()
def layer_scores(model: nn.Module, layers: nn.Module, batches: Iterable[dict],
                 metric: str = "block-influence", run=None) -> list[float]:
    """The importance of each block in `layers` (higher = more important), over token batches. `run`
    runs the batches (reshape/inputs.py `whole_model`, the default, or block by block)."""
    totals = [0.0] * len(layers)
    tokens: dict[int, int] = {}  # per batch
    current_mask: list[torch.Tensor | None] = [None]

    def on_batch(index, batch):
        current_mask[0] = mask = batch.get("attention_mask")
        if index not in tokens:
            tokens[index] = int(mask.sum()) if mask is not None else next(iter(batch.values())).numel()

    def hook(index):
        def record(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, (tuple, list)) else output  # GPT-1 blocks return lists
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # [batch, tokens]
            value = 1 - cos if metric == "block-influence" else torch.arccos(cos.clamp(-1, 1)) / math.pi
            mask = current_mask[0]
            totals[index] += float(value[mask.bool()].sum() if mask is not None else value.sum())
        return record

    handles = [block.register_forward_hook(hook(i), with_kwargs=True) for i, block in enumerate(layers)]
    try:
        (run or whole_model(model))(batches, on_batch, len(layers) - 1)
    finally:
        for handle in handles:
            handle.remove()
    count = sum(tokens.values())
    return [round(t / max(count, 1), 6) for t in totals]


def most_important(scores: list[float], depth: int) -> tuple[int, ...]:
    """The `depth` highest-scoring layers, in model order."""
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
    return tuple(sorted(ranked[:depth]))


def keep_most_important(family, shape, plan, scores: list[float]):
    """`plan` keeping the highest-scoring layers, checked by the family's rules as a listed --keep is
    (ModernBERT's first layer cannot be dropped): one line, not a rebuilt model that does not fit."""
    plan = replace(plan, keep=most_important(scores, plan.depth))
    problem = family.plan_problem(shape, plan)
    if problem:
        raise ReshapeError([problem])
    return plan
