"""Distillation losses: zero on identical inputs, hand-checked values, masks, layer maps, Q/K/V capture."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from helpers.cases import bert_config, gpt2_config, llama_config, text_inputs

import reshape
from reshape.errors import ReshapeError
from reshape.families import find_family
from reshape.plan import Shape, make_plan, select_layers, target_shape
from reshape.train.losses import (
    DistillWeights,
    attention_relation_loss,
    capture_qkv,
    combine,
    hidden_loss,
    layer_map,
    logit_kl,
    pooled_cosine,
    task_loss,
)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def padded_mask(batch=2, tokens=6):
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[1, -2:] = 0
    return mask


def scramble_padding(x, mask, seed=99):
    """The same tensor with different (huge) values at padded positions."""
    noise = 1e3 * randn(*x.shape, seed=seed)
    pad = ~mask.bool()
    return torch.where(pad.reshape(*pad.shape, *([1] * (x.dim() - pad.dim()))), noise, x)


# --- layer_map -------------------------------------------------------------------------------------------


def recipe_for(layers, depth, heads=12):
    shape = Shape(layers=layers, heads=heads, kv_heads=heads, head_dim=64, hidden=64 * heads, mlp=256 * heads)
    plan = make_plan(shape, family="bert", heads=heads, depth=depth)
    return {"plan": plan.to_dict(), "source_shape": shape.to_dict(), "shape": target_shape(shape, plan).to_dict()}


@pytest.mark.parametrize("layers,depth", [(12, 8), (6, 4), (5, 3), (12, 12), (7, 1)])
def test_layer_map_follows_the_kept_layers(layers, depth):
    mapping = layer_map(recipe_for(layers, depth), layers, depth)
    assert mapping == list(select_layers(layers, depth, "uniform"))
    assert len(mapping) == depth and mapping == sorted(set(mapping)) and mapping[-1] < layers


def test_layer_map_reads_a_real_reshape_json(tmp_path):
    torch.manual_seed(0)
    tf.BertModel(bert_config()).save_pretrained(tmp_path / "teacher")
    reshape.convert(str(tmp_path / "teacher"), tmp_path / "student", heads=8, depth=3)
    recipe = json.loads((tmp_path / "student" / "reshape.json").read_text())
    assert layer_map(recipe, 4, 3) == [0, 2, 3]


def test_explicit_layer_map_wins_over_the_recipe():
    assert layer_map(recipe_for(12, 8), 12, 8, explicit=[4, 5, 6, 7, 8, 9, 10, 11]) == [4, 5, 6, 7, 8, 9, 10, 11]
    assert layer_map(None, 5, 3, explicit=[0, 1, 4]) == [0, 1, 4]


@pytest.mark.parametrize("recipe,teacher,student,explicit,message", [
    (None, 6, 4, None,
     "layer_map=None: the student has no reshape.json to map its layers to the teacher's; pass --layer-map 0,2,3,5"),
    (None, 6, 4, [0, 2, 5], "layer_map=0,2,5: lists 3 layers but the student has 4; .*e.g. 0,2,3,5"),
    (None, 6, 3, [0, 2, 6], "layer_map=0,2,6: has indices 6 outside the teacher's layers 0..5"),
    (None, 6, 3, [0, 3, 3], "layer_map=0,3,3: is not strictly increasing"),
    (None, 6, 3, [3, 1, 5], "layer_map=3,1,5: is not strictly increasing"),
    (recipe_for(12, 8), 6, 8, None, "teacher_layers=6: differs from the 12 layers of the model the student"),
    (recipe_for(12, 8), 12, 6, None, r"reshape.json plan.keep=0,2,3,5,6,8,9,11: lists 8 layers but the student has 6"),
    ({"source_shape": {"layers": 12}}, 12, 8, None, "reshape.json=plan.keep: is missing"),
])
def test_layer_map_errors(recipe, teacher, student, explicit, message):
    with pytest.raises(ReshapeError, match=message) as e:
        layer_map(recipe, teacher, student, explicit)
    assert len(str(e.value).splitlines()) == 1


# --- logit KL --------------------------------------------------------------------------------------------


def test_logit_kl_matches_a_hand_computation():
    student, teacher = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[1.0, 0.0, 0.5]])
    for t in (1.0, 2.0, 4.0):
        p = [math.exp(x / t) for x in teacher[0].tolist()]
        q = [math.exp(x / t) for x in student[0].tolist()]
        p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
        expected = t * t * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        assert logit_kl(student, teacher, temperature=t).item() == pytest.approx(expected, rel=1e-5)


def test_logit_kl_is_zero_for_identical_logits_and_positive_otherwise():
    logits = randn(3, 5, 11)
    assert logit_kl(logits, logits.clone()).item() == pytest.approx(0, abs=1e-6)
    assert logit_kl(randn(3, 5, 11, seed=1), logits).item() > 0.01
    # The teacher is a constant: gradients reach the student only.
    student, teacher = logits.clone().requires_grad_(), randn(3, 5, 11, seed=1).requires_grad_()
    logit_kl(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None


def test_logit_kl_averages_over_unmasked_tokens_only():
    student, teacher, mask = randn(2, 6, 11, seed=1), randn(2, 6, 11, seed=2), padded_mask()
    loss = logit_kl(student, teacher, mask=mask)
    assert logit_kl(scramble_padding(student, mask), scramble_padding(teacher, mask, seed=7), mask=mask) == loss
    # Equal to the mean of per-token KLs over the 10 real tokens.
    keep = mask.bool()
    assert loss.item() == pytest.approx(logit_kl(student[keep], teacher[keep]).item(), rel=1e-6)


def test_logit_kl_refuses_mismatched_shapes():
    with pytest.raises(ReshapeError, match=r"logits=\(2, 5\) vs \(2, 6\)"):
        logit_kl(randn(2, 5), randn(2, 6))
    with pytest.raises(ReshapeError, match="temperature=0"):
        logit_kl(randn(2, 5), randn(2, 5), temperature=0)


# --- hidden states ---------------------------------------------------------------------------------------


def hidden_tuple(layers, seed=0, batch=2, tokens=6, width=16):
    return tuple(randn(batch, tokens, width, seed=seed + i) for i in range(layers + 1))


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_loss_matches_each_student_layer_to_its_mapped_teacher_layer(kind):
    teacher = hidden_tuple(6)
    mapping = [0, 2, 3, 5]
    student = (teacher[0],) + tuple(teacher[j + 1] for j in mapping)
    assert hidden_loss(student, teacher, mapping, kind=kind).item() == pytest.approx(0, abs=1e-6)
    assert hidden_loss(student, teacher, [0, 1, 3, 5], kind=kind).item() > 0.1
    # Embeddings count only with include_embeddings.
    other_embeddings = (randn(2, 6, 16, seed=50),) + student[1:]
    assert hidden_loss(other_embeddings, teacher, mapping, kind=kind).item() > 0.01
    assert hidden_loss(other_embeddings, teacher, mapping, kind=kind,
                       include_embeddings=False).item() == pytest.approx(0, abs=1e-6)


def test_hidden_loss_values():
    teacher = hidden_tuple(1)
    shifted = tuple(h + 0.5 for h in teacher)
    assert hidden_loss(shifted, teacher, [0], kind="mse").item() == pytest.approx(0.25)
    scaled = tuple(3 * h for h in teacher)  # cosine ignores the scale, MSE does not
    assert hidden_loss(scaled, teacher, [0], kind="cosine").item() == pytest.approx(0, abs=1e-6)
    assert hidden_loss(scaled, teacher, [0], kind="mse").item() > 1


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_loss_ignores_padding(kind):
    teacher, student, mask = hidden_tuple(4), hidden_tuple(2, seed=10), padded_mask()
    loss = hidden_loss(student, teacher, [1, 3], kind=kind, mask=mask)
    scrambled = tuple(scramble_padding(h, mask, seed=i) for i, h in enumerate(student))
    assert hidden_loss(scrambled, teacher, [1, 3], kind=kind, mask=mask) == loss


def test_hidden_loss_refuses_other_widths_and_bad_maps():
    teacher, narrow = hidden_tuple(4), hidden_tuple(2, width=8)
    with pytest.raises(ReshapeError, match="hidden=8 vs 16: the student's hidden width differs"):
        hidden_loss(narrow, teacher, [1, 3])
    with pytest.raises(ReshapeError, match="layer_map=1: maps 1 student layers but the student has 2"):
        hidden_loss(hidden_tuple(2), teacher, [1])
    with pytest.raises(ReshapeError, match=r"layer_map=1,4: points outside the teacher's layers 0..3"):
        hidden_loss(hidden_tuple(2), teacher, [1, 4])
    with pytest.raises(ReshapeError, match="kind=l1"):
        hidden_loss(hidden_tuple(2), teacher, [1, 3], kind="l1")


# --- attention relations ---------------------------------------------------------------------------------


def qkv(q=32, kv=32, seed=0, batch=2, tokens=6):
    return {"q": randn(batch, tokens, q, seed=seed), "k": randn(batch, tokens, kv, seed=seed + 1),
            "v": randn(batch, tokens, kv, seed=seed + 2)}


def test_relation_loss_is_zero_for_identical_projections_and_positive_otherwise():
    teacher = qkv()
    assert attention_relation_loss(teacher, {k: v.clone() for k, v in teacher.items()}, 4).item() == \
        pytest.approx(0, abs=1e-6)
    assert attention_relation_loss(qkv(seed=10), teacher, 4).item() > 0.01


def test_relation_loss_compares_narrower_kv_projections():
    """A student whose K/V are half the teacher's width (grouped KV heads) has the same relations as a
    teacher whose chunks are the student's, duplicated and rescaled: only relation_heads decide the split."""
    student = qkv(q=32, kv=16, seed=3)
    b, t, r = 2, 6, 4
    wide = {}
    for name, x in student.items():
        chunks = x.view(b, t, r, -1)
        if name == "q":
            wide[name] = x.clone()
        else:  # [a, a] * 2^-1/4 per chunk: 2 c² a·a / √(2d) = a·a / √d
            wide[name] = (torch.cat([chunks, chunks], -1) * 2**-0.25).reshape(b, t, -1)
    assert wide["k"].shape[-1] == 32
    assert attention_relation_loss(student, wide, r).item() == pytest.approx(0, abs=1e-5)
    assert attention_relation_loss(student, qkv(q=32, kv=32, seed=20), r).item() > 0.01


def test_relation_loss_ignores_padded_queries_and_keys():
    student, teacher, mask = qkv(seed=1), qkv(seed=5), padded_mask()
    loss = attention_relation_loss(student, teacher, 4, mask=mask)
    scrambled = {k: scramble_padding(v, mask, seed=i) for i, (k, v) in enumerate(student.items())}
    assert torch.allclose(attention_relation_loss(scrambled, teacher, 4, mask=mask), loss, atol=1e-6)
    # Row 1 with its padding cut off gives the same per-token relations as computing it alone.
    short = {k: v[1:, :4] for k, v in student.items()}, {k: v[1:, :4] for k, v in teacher.items()}
    row0 = {k: v[:1] for k, v in student.items()}, {k: v[:1] for k, v in teacher.items()}
    by_rows = (6 * attention_relation_loss(*row0, 4) + 4 * attention_relation_loss(*short, 4)) / 10
    assert loss.item() == pytest.approx(by_rows.item(), rel=1e-5)
    # A fully padded row stays finite and the gradient has no NaN.
    s = {k: v.clone().requires_grad_() for k, v in student.items()}
    attention_relation_loss(s, teacher, 4, mask=torch.tensor([[1] * 6, [0] * 6])).backward()
    assert all(torch.isfinite(v.grad).all() for v in s.values())


def test_relation_loss_refuses_a_relation_head_count_that_does_not_divide():
    with pytest.raises(ReshapeError, match=r"relation_heads=5: does not divide every Q/K/V width \(16,32\); "
                                           "use one of 1, 2, 4, 8, 16"):
        attention_relation_loss(qkv(q=32, kv=16), qkv(), 5)


# --- pooled embeddings, task ----------------------------------------------------------------------------


def test_pooled_cosine():
    teacher, mask = randn(2, 6, 16), padded_mask()
    assert pooled_cosine(teacher.clone(), teacher, mask).item() == pytest.approx(0, abs=1e-6)
    assert pooled_cosine(2 * teacher, teacher, mask).item() == pytest.approx(0, abs=1e-6)
    student = randn(2, 6, 16, seed=4)
    loss = pooled_cosine(student, teacher, mask)
    assert loss.item() > 0.01
    assert pooled_cosine(scramble_padding(student, mask), scramble_padding(teacher, mask, seed=5), mask) == loss
    pooled = [student[i, : int(mask[i].sum())].mean(0) for i in range(2)]
    targets = [teacher[i, : int(mask[i].sum())].mean(0) for i in range(2)]
    expected = sum(1 - F.cosine_similarity(a, b, dim=0) for a, b in zip(pooled, targets)) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_task_loss():
    logits, labels = randn(4, 3), torch.tensor([0, 2, 1, 2])
    assert task_loss(logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert task_loss(100 * F.one_hot(labels, 3).float(), labels).item() == pytest.approx(0, abs=1e-6)
    tokens, token_labels = randn(2, 5, 7), torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 0, -100]])
    keep = token_labels != -100
    assert task_loss(tokens, token_labels).item() == pytest.approx(
        F.cross_entropy(tokens[keep], token_labels[keep]).item(), rel=1e-6)
    assert task_loss(tokens, torch.full((2, 5), -100)).item() == 0
    with pytest.raises(ReshapeError, match=r"labels=\(2,\): do not line up"):
        task_loss(tokens, torch.tensor([1, 2]))


# --- weights ---------------------------------------------------------------------------------------------


def test_combine_weights_terms_and_skips_those_that_are_off():
    terms = {"kl": torch.tensor(2.0), "hidden": torch.tensor(3.0), "relation": torch.tensor(float("nan"))}
    total, logged = combine(terms, DistillWeights(kl=1.0, hidden=0.5))
    assert total.item() == 3.5 and logged == {"kl": 2.0, "hidden": 3.0}
    total, logged = combine({"kl": torch.tensor(2.0), "task": torch.tensor(1.0)})
    assert total.item() == 3.0 and set(logged) == {"kl", "task"}


def test_default_weights():
    w = DistillWeights()
    assert (w.kl, w.hidden, w.relation, w.pooled, w.task) == (1.0, 1.0, 0.0, 0.0, 1.0)


def test_weight_errors():
    with pytest.raises(ReshapeError, match="weights.kl=-1: must be a finite number >= 0"):
        DistillWeights(kl=-1)
    with pytest.raises(ReshapeError, match="loss=attention: is not a loss term"):
        combine({"attention": torch.tensor(1.0)})
    with pytest.raises(ReshapeError, match="weights=relation,pooled: every loss term given has weight 0"):
        combine({"relation": torch.tensor(1.0), "pooled": torch.tensor(1.0)})


# --- capturing Q/K/V on real (tiny) models ---------------------------------------------------------------


def block_inputs(blocks, indices):
    """Forward pre-hooks that record each block's input hidden states."""
    seen = {}

    def recorder(i):
        def hook(module, args, kwargs):
            seen[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    return seen, [blocks[i].register_forward_pre_hook(recorder(i), with_kwargs=True) for i in indices]


def run_with_capture(model, indices):
    family = find_family(model)
    blocks = family.layers(model)
    seen, handles = block_inputs(blocks, indices)
    with torch.no_grad(), capture_qkv(model, family, indices) as captured:
        model(**text_inputs())
    for h in handles:
        h.remove()
    return blocks, seen, captured


def assert_no_hooks(model):
    assert all(not m._forward_hooks for m in model.modules())


def test_capture_qkv_bert_separate_projections():
    torch.manual_seed(0)
    model = tf.BertModel(bert_config()).eval()
    blocks, seen, captured = run_with_capture(model, [0, 2])
    assert set(captured) == {0, 2}
    for i in (0, 2):
        attn = blocks[i].attention.self
        assert {k: tuple(v.shape) for k, v in captured[i].items()} == {"q": (2, 7, 64), "k": (2, 7, 64),
                                                                        "v": (2, 7, 64)}
        with torch.no_grad():
            for role, proj in (("q", attn.query), ("k", attn.key), ("v", attn.value)):
                torch.testing.assert_close(captured[i][role], proj(seen[i]))
    assert not torch.equal(captured[0]["q"], captured[2]["q"])
    assert_no_hooks(model)


def test_capture_qkv_gpt2_splits_the_fused_conv1d():
    torch.manual_seed(0)
    model = tf.GPT2Model(gpt2_config()).eval()
    blocks, seen, captured = run_with_capture(model, [1, 3])
    for i in (1, 3):
        with torch.no_grad():
            fused = blocks[i].attn.c_attn(blocks[i].ln_1(seen[i]))
        assert fused.shape == (2, 7, 192)
        for j, role in enumerate("qkv"):
            assert captured[i][role].shape == (2, 7, 64)
            torch.testing.assert_close(captured[i][role], fused[..., 64 * j: 64 * (j + 1)])
    assert_no_hooks(model)


def test_capture_qkv_llama_with_grouped_kv_heads():
    torch.manual_seed(0)
    model = tf.LlamaModel(llama_config()).eval()  # 4 heads, 2 KV heads, head dim 16
    blocks, seen, captured = run_with_capture(model, [0, 3])
    for i in (0, 3):
        attn, x = blocks[i].self_attn, blocks[i].input_layernorm(seen[i])
        assert {k: tuple(v.shape) for k, v in captured[i].items()} == {"q": (2, 7, 64), "k": (2, 7, 32),
                                                                        "v": (2, 7, 32)}
        with torch.no_grad():
            for role, proj in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj)):
                torch.testing.assert_close(captured[i][role], proj(x))
    assert_no_hooks(model)


def test_capture_qkv_keeps_the_student_graph_and_removes_hooks_on_error():
    torch.manual_seed(0)
    model = tf.LlamaModel(llama_config())
    family = find_family(model)
    with capture_qkv(model, family, [1]) as captured:
        model(**text_inputs())
    assert captured[1]["q"].grad_fn is not None
    with pytest.raises(RuntimeError), capture_qkv(model, family, [0, 1]):
        raise RuntimeError("interrupted")
    assert_no_hooks(model)
    with pytest.raises(ReshapeError, match="layers=4: are outside the model's layers 0..3"):
        with capture_qkv(model, family, [0, 4]):
            pass


def test_relation_loss_depends_on_relation_heads_not_on_the_model_heads():
    """Students with the same weights read as 4 or 8 heads (keep-width) give the same relation loss."""
    torch.manual_seed(0)
    teacher = tf.LlamaModel(llama_config()).eval()  # 4 heads, 2 KV heads
    students = [reshape.leaner(teacher, heads=h, keep=[0, 3]) for h in (4, 8)]
    assert [find_family(s).shape(s.config).kv_heads for s in students] == [2, 4]
    inputs = text_inputs()
    mask = inputs["attention_mask"]

    def capture(model, indices):
        with torch.no_grad(), capture_qkv(model, find_family(model), indices) as captured:
            model(**inputs)
        return captured

    t = capture(teacher, [0, 2])
    losses = []
    for student in students:
        s = capture(student, [0])
        # Layer 0 sees the same input as the teacher's layer 0, so its projections are the teacher's.
        assert attention_relation_loss(s[0], t[0], 4, mask=mask).item() == pytest.approx(0, abs=1e-6)
        losses.append(attention_relation_loss(s[0], t[2], 4, mask=mask).item())
    # Small (random init with std 0.02 gives near-uniform relations) but not zero, and the same for both.
    assert losses[0] > 1e-5 and losses[0] == pytest.approx(losses[1], rel=1e-6)
    # An MHA teacher (K/V width 64) against the GQA student (K/V width 32): comparable, finite.
    mha = tf.LlamaModel(llama_config(num_key_value_heads=4)).eval()
    loss = attention_relation_loss(capture(students[0], [0])[0], capture(mha, [1])[1], 8, mask=mask)
    assert torch.isfinite(loss) and loss.item() > 0
