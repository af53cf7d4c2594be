"""The plan: layer selection, head arithmetic, and that every problem is reported at once."""

import pytest

from reshape.errors import ReshapeError
from reshape.plan import Shape, head_sources, make_plan, rule_of_thumb, select_layers, target_shape

BERT_BASE = Shape(layers=12, heads=12, kv_heads=12, head_dim=64, hidden=768, mlp=3072)
SMOLLM2 = Shape(layers=30, heads=9, kv_heads=3, head_dim=64, hidden=576, mlp=1536)


@pytest.mark.parametrize("layers,depth,strategy,expected", [
    (12, 8, "uniform", (0, 2, 3, 5, 6, 8, 9, 11)),
    (6, 4, "uniform", (0, 2, 3, 5)),
    (12, 6, "uniform", (0, 2, 4, 7, 9, 11)),
    (12, 12, "uniform", tuple(range(12))),
    (12, 2, "uniform", (0, 11)),
    (12, 1, "uniform", (0,)),
    (12, 3, "first", (0, 1, 2)),
    (12, 3, "last", (9, 10, 11)),
])
def test_select_layers(layers, depth, strategy, expected):
    assert select_layers(layers, depth, strategy) == expected


def test_keep_width_rereads_the_same_width_as_more_heads():
    plan = make_plan(BERT_BASE, family="bert", heads=24, depth=8)
    assert plan.keep == (0, 2, 3, 5, 6, 8, 9, 11) and plan.head_mode == "keep-width"
    new = target_shape(BERT_BASE, plan)
    assert (new.heads, new.head_dim, new.attn_width, new.layers) == (24, 32, 768, 8)


def test_gqa_keep_width_scales_kv_heads_and_keep_head_dim_keeps_them():
    new = target_shape(SMOLLM2, make_plan(SMOLLM2, family="llama", heads=18, depth=20))
    assert (new.heads, new.kv_heads, new.head_dim) == (18, 6, 32)
    wide = target_shape(SMOLLM2, make_plan(SMOLLM2, family="llama", heads=18, depth=20, keep_head_dim=True))
    assert (wide.heads, wide.kv_heads, wide.head_dim, wide.attn_width) == (18, 3, 64, 1152)


def test_gqa_error_lists_the_legal_head_counts():
    with pytest.raises(ReshapeError) as e:
        make_plan(SMOLLM2, family="llama", heads=16)
    assert str(e.value).startswith("heads=16: would need 3x16/9 KV heads")
    assert "use one of 9, 12, 18, 24, 36, 48, 72" in str(e.value)
    with pytest.raises(ReshapeError, match="heads=10: is not a multiple of the 3 KV heads.*use one of 9, 12, 15, 18, 21"):
        make_plan(SMOLLM2, family="llama", heads=10, keep_head_dim=True)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ReshapeError) as e:
        make_plan(BERT_BASE, family="bert", heads=7, depth=0, mlp=5000, select="middle")
    fields = [p.field for p in e.value.problems]
    assert fields == ["heads", "depth", "select", "mlp"]
    assert str(e.value).splitlines()[0] == (
        "heads=7: does not divide the attention width 768; use one of 12, 16, 24, 32, 48, 64, 96")


@pytest.mark.parametrize("kwargs,message", [
    (dict(heads=6), "heads=6: is fewer than the model's 12 (reshape adds heads); pass --allow-fewer-heads"),
    (dict(heads=128), "heads=128: gives head dim 6, below the minimum 8; use fewer heads or pass --force"),
    (dict(depth=13), "depth=13: must be between 1 and the model's 12 layers"),
    (dict(keep=[0, 12]), "keep=0,12: has indices 12 outside 0..11"),
    (dict(keep=[0, 3, 3]), "keep=0,3,3: repeats 3; list each kept layer once"),
    (dict(keep=[3, 0]), "keep=3,0: is not in increasing order; write it as 0,3"),
    (dict(keep=[0, 3], depth=3), "keep=0,3: lists 2 layers but depth is 3"),
    (dict(mlp=0), "mlp=0: must be between 1 and the current MLP width 3072"),
    (dict(init="zeros"), "init=zeros: is not an initialisation; use one of transfer, random"),
    (dict(heads=24, keep_head_dim=True, can_widen_attention=False), "head_mode=keep-head-dim: a bert config cannot"),
])
def test_bad_requests_name_field_value_and_fix(kwargs, message):
    with pytest.raises(ReshapeError) as e:
        make_plan(BERT_BASE, family="bert", **kwargs)
    assert len(e.value.problems) == 1 and str(e.value).startswith(message)


def test_overrides():
    assert make_plan(BERT_BASE, family="bert", heads=6, allow_fewer_heads=True).heads == 6
    assert make_plan(BERT_BASE, family="bert", heads=128, force=True).heads == 128
    assert make_plan(BERT_BASE, family="bert", keep=[0, 5, 11]).keep == (0, 5, 11)
    assert make_plan(BERT_BASE, family="bert", mlp=3072).mlp is None  # the current width is no change


def test_rule_of_thumb():
    assert rule_of_thumb(BERT_BASE) == (24, 8)
    assert rule_of_thumb(Shape(6, 12, 12, 32, 384, 1536)) == (24, 4)
    assert rule_of_thumb(Shape(4, 4, 4, 8, 32, 64)) == (4, 3)  # doubling would give head dim 4


def test_head_sources_stay_in_their_kv_group():
    gqa = Shape(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32, mlp=64)
    assert head_sources(gqa, 8) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert head_sources(gqa, 6) == [0, 0, 1, 2, 2, 3]
    mha = Shape(layers=2, heads=4, kv_heads=4, head_dim=8, hidden=32, mlp=64)
    assert head_sources(mha, 6) == [0, 0, 1, 2, 2, 3]
    assert head_sources(mha, 4) == [0, 1, 2, 3]
