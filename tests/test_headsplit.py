"""The function-aware head split: exact where the score form fits the narrower heads, refused where it cannot apply."""

from __future__ import annotations

import pytest
import torch

from helpers.cases import CASES, by_id, case_params, first_output

import reshape
from reshape.errors import ReshapeError
from reshape.families import find_family
from reshape.headsplit import _role_rows

SPLITTABLE = [c for c in CASES if find_family(c.model()).can_split_aware]


def low_rank_queries(model: torch.nn.Module) -> torch.nn.Module:
    """Zero the second half of every query head, so each head's score form has rank head_dim / 2, and
    sharpen the attention (small random weights attend almost uniformly, however they are split)."""
    family = find_family(model)
    shape = family.shape(family.spec(model).config)
    proj, rows = _role_rows(family.weights, "q", shape)
    with torch.no_grad():
        for block in family.layers(model):
            linear = block.get_submodule(proj.name)
            linear.weight.mul_(20)
            for h in range(shape.heads):
                start = rows.start + h * shape.head_dim + shape.head_dim // 2
                dropped = slice(start, rows.start + (h + 1) * shape.head_dim)
                if proj.conv1d:
                    linear.weight[:, dropped] = 0
                else:
                    linear.weight[dropped] = 0
                if linear.bias is not None:
                    linear.bias[dropped] = 0
    return model


@pytest.mark.parametrize("case", case_params(SPLITTABLE))
def test_aware_split_is_exact_when_each_head_fits_the_narrower_heads(case):
    model = low_rank_queries(case.model())
    aware = reshape.leaner(model, heads=case.heads, head_split="aware")  # every case doubles its 4 heads
    contiguous = reshape.leaner(model, heads=case.heads, head_split="contiguous")
    expected = first_output(model, case.inputs())
    torch.testing.assert_close(first_output(aware, case.inputs()), expected, rtol=1e-4, atol=1e-5)
    # The contiguous split changes every head's softmax, so it does not reproduce the source.
    error = (first_output(contiguous, case.inputs()) - expected).norm() / expected.norm()
    assert error > 1e-3


def test_aware_is_the_default_where_it_applies():
    bert, llama = by_id("bert-model").model(), by_id("llama-lm").model()
    assert reshape.make_plan(find_family(bert).shape(bert.config), family="bert", heads=8).head_split == "aware"
    low_rank_queries(bert)
    default = reshape.leaner(bert, heads=8)
    torch.testing.assert_close(first_output(default, by_id("bert-model").inputs()),
                               first_output(bert, by_id("bert-model").inputs()), rtol=1e-4, atol=1e-5)
    # Rotary models fall back to the contiguous split, which copies the weights as they are.
    split = reshape.leaner(llama, heads=8)
    assert all(torch.equal(a, b) for a, b in zip(split.parameters(), llama.parameters()))


def test_aware_split_uses_calibration_batches():
    model = by_id("bert-model").model()
    calib = [by_id("bert-model").inputs()]
    with_data = reshape.leaner(model, heads=8, head_split="aware", calib=calib)
    without = reshape.leaner(model, heads=8, head_split="aware")
    q = "encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(with_data.state_dict()[q], without.state_dict()[q])


@pytest.mark.parametrize("kwargs, message", [
    (dict(heads=8, head_split="aware", model="llama-lm"),
     "head_split=aware: is not available for llama (rotary positions"),
    (dict(heads=16, head_split="aware", keep_head_dim=True, model="llama-mha-model"),
     "head_split=aware: is not available for llama"),
    (dict(heads=8, head_split="rotated", model="bert-model"), "head_split=rotated: is not a head split; use one of"),
    (dict(heads=8, head_split="aware", keep_head_dim=True, model="gpt2-lm"), "head_split=aware: splits each of"),
])
def test_bad_head_split_is_refused(kwargs, message):
    model = by_id(kwargs.pop("model")).model()
    with pytest.raises(ReshapeError, match=message.replace("(", r"\(")):
        reshape.leaner(model, **kwargs)
