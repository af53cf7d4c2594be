"""Conditioning of the attention blocks, measured on real inputs (the paper's κ, and head redundancy).

For each block, the concatenated head outputs before the output projection form, per sample, an N x D
matrix (N real tokens, D = heads x head dim). Its condition number κ = σ_max / σ_min over the min(N, D)
singular values is the paper's measure: more heads should lower it. It is captured with a forward
pre-hook on the output projection, so it works for every family without touching attention code.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .families import find_family
from .inputs import run_with_input_hooks


def kappa(matrix: torch.Tensor) -> float:
    """σ_max / σ_min of one N x D matrix, over its min(N, D) singular values (inf when rank-deficient)."""
    values = torch.linalg.svdvals(matrix.double())
    return float(values[0] / values[-1]) if values[-1] > 0 else float("inf")


def head_outputs(model: nn.Module, family, batches: Iterable[dict]) -> dict[int, list[torch.Tensor]]:
    """Per layer, each sample's concatenated head outputs [real tokens, heads x head dim]."""
    captured: dict[int, list[torch.Tensor]] = {}

    def record(index, x, mask):
        for b in range(x.shape[0]):
            keep = mask[b].bool() if mask is not None else slice(None)
            captured.setdefault(index, []).append(x[b][keep].float())

    modules = {i: block.get_submodule(family.weights.attn_out.name) for i, block in enumerate(family.layers(model))}
    run_with_input_hooks(model, modules, batches, record)
    return captured


def layer_heads(shape) -> list[int]:
    """The head count of every block, in the order family.layers walks them (stage by stage)."""
    stages = getattr(shape, "stages", (shape,))  # a StagedShape, or one block stack
    return [s.heads for s in stages for _ in range(s.layers)]


def layer_conditioning(model: nn.Module, family, batches: Iterable[dict], heads: list[int]) -> list[dict]:
    """Per layer: κ's median and interquartile range over the samples, and the mean absolute
    correlation between the outputs of different heads (1 = fully redundant heads). `heads`: each
    layer's head count (see `layer_heads`)."""
    result = []
    for index, samples in sorted(head_outputs(model, family, batches).items()):
        values = torch.tensor([kappa(x) for x in samples], dtype=torch.float64)
        finite = values[values.isfinite()]
        q = torch.quantile(finite, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)) if len(finite) \
            else torch.full((3,), float("inf"))
        result.append({"layer": index, "kappa_median": round(float(q[1]), 4),
                       "kappa_iqr": [round(float(q[0]), 4), round(float(q[2]), 4)],
                       "head_correlation": round(head_correlation(torch.cat(samples), heads[index]), 4)})
    return result


def head_correlation(outputs: torch.Tensor, heads: int) -> float:
    """Mean |Pearson correlation| between heads, each head's outputs flattened over tokens and dims."""
    if heads < 2:
        return 0.0
    per_head = outputs.reshape(outputs.shape[0], heads, -1).transpose(0, 1).reshape(heads, -1)
    corr = torch.corrcoef(per_head.double())
    off_diagonal = corr[~torch.eye(heads, dtype=torch.bool)]
    return float(off_diagonal.nan_to_num(0).abs().mean())


def kappa_log(model: nn.Module, batches: list[dict]) -> dict:
    """Per-layer median κ on fixed held-out batches, for the metrics log during training (--log-kappa)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # inside --lora's peft wrapper
    family = find_family(model)
    heads = layer_heads(family.shape(family.spec(model).config))
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in batch.items() if k != "labels"} for batch in batches]
    return {"kappa": [layer["kappa_median"] for layer in layer_conditioning(model, family, batches, heads)]}


def with_kappa(eval_fn, rows, collate, enabled: bool, probe_rows: int = 32):
    """eval_fn, plus each layer's κ on the first held-out rows when enabled."""
    if not enabled:
        return eval_fn
    batches = [collate([rows[i] for i in range(min(probe_rows, len(rows)))])]
    return lambda model: {**eval_fn(model), **kappa_log(model, batches)}
