"""The coverage matrix as a test: every covered transformers model type, as a tiny random config built in
code, goes through the same checks. Adding an architecture means adding one line to COVERED
(tests/helpers/conformance.py).

Checks: a no-op plan reproduces the outputs; doubled heads and two thirds of the depth run; the exact
parameter count (kept blocks + everything outside the stack, per-head tensors scaled by the head
count); keep-head-dim reproduces the outputs where the config can express it; the saved folder reloads
with plain transformers in a process that never imports reshape and gives identical outputs.
Per-head rules (bias inheritance, q/k norms, MoE experts, interleaved fused Q/K/V, per-layer config)
have their own tests below, each of which fails if its rule is wrong.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.conformance import COVERED, per_stack, plan_of, stacks

import reshape
from reshape.errors import ReshapeError
from reshape.families import find_family
from reshape.testing import tiny_inputs, tiny_model

REFUSED = {"convnext": "no single num_attention_heads",
           "diffllama": "heads=8: changes the head count, and its differential attention pairs",
           "roformer": r"the tensors \(encoder.embed_positions.weight\) are laid out over the head dim",
           "gpt_bigcode": "no Q/K/V projections found"}


def output(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def noop_plan(model) -> dict:
    shapes = [s for _, s in stacks(model)]
    return dict(heads=per_stack([s.heads for s in shapes]), depth=per_stack([s.layers for s in shapes]))


def expected_params(model, plan) -> int:
    """Parameters of the planned keep-width model counted from the source: everything outside the block
    stacks, plus the kept blocks, with per-head tensors (bias tables) growing with the heads."""
    family = find_family(model)
    keeps = plan.keep if isinstance(plan.keep[0], list) else [plan.keep]
    heads = plan.heads if isinstance(plan.heads, list) else [plan.heads]
    inside = {id(p) for stack, _ in stacks(model) for p in stack.parameters()}
    per_head = set(family.weights.per_head)
    outside_per_head = set(family.outside_per_head(model))
    ratio = heads[0] / stacks(model)[0][1].heads
    total = sum(int(p.numel() * (ratio if name in outside_per_head else 1))
                for name, p in model.named_parameters() if id(p) not in inside)
    if family.shared_layers:
        keeps = [[0]]  # one shared block, whatever the depth
    for (stack, shape), keep, new_heads in zip(stacks(model), keeps, heads):
        for index in keep:
            for name, p in stack[index].named_parameters():
                total += int(p.numel() * (new_heads / shape.heads if name in per_head else 1))
    return total


@pytest.mark.parametrize("model_type", sorted(COVERED))
class TestConformance:
    def test_noop_plan_reproduces_outputs(self, model_type):
        model = tiny_model(model_type)
        same = reshape.leaner(model, **noop_plan(model))
        inputs = tiny_inputs(model)
        torch.testing.assert_close(output(same, inputs), output(model, inputs))

    def test_doubled_heads_and_two_thirds_depth(self, model_type):
        model = tiny_model(model_type)
        plan = plan_of(model_type, model)
        new = reshape.leaner(model, **plan)
        shapes = [s for _, s in stacks(new)]
        assert per_stack([s.heads for s in shapes]) == plan["heads"]
        assert per_stack([s.layers for s in shapes]) == plan["depth"]
        inputs = tiny_inputs(model)
        assert output(new, inputs).shape == output(model, inputs).shape
        assert torch.isfinite(output(new, inputs)).all()

    def test_exact_parameter_count(self, model_type):
        model = tiny_model(model_type)
        if COVERED[model_type] == "keep-head-dim":
            pytest.skip("keep-width is refused for q/k norms over the head dim; keep-head-dim is checked below")
        plan = plan_of(model_type, model)
        # uniform selection, as plan_for resolves it (decoders default to Block Influence, which may
        # pick layers of another kind where a stack mixes dense and mixture-of-experts layers)
        new = reshape.leaner(model, heads=plan["heads"], depth=plan["depth"], head_split="contiguous", select="uniform")
        resolved = reshape.pipeline.plan_for(find_family(model).spec(model), plan["heads"], plan["depth"])
        assert sum(p.numel() for p in new.parameters()) == expected_params(model, resolved)

    def test_keep_head_dim_reproduces_outputs(self, model_type):
        model = tiny_model(model_type)
        family = find_family(model)
        if not family.can_widen_attention:
            with pytest.raises(ReshapeError, match="keep-head-dim|head_mode"):
                reshape.leaner(model, **{**plan_of(model_type, model), "keep_head_dim": True})
            return
        shape = family.shape(model.config)
        wide = reshape.leaner(model, heads=2 * shape.heads, depth=shape.layers, keep_head_dim=True)
        inputs = tiny_inputs(model)
        torch.testing.assert_close(output(wide, inputs), output(model, inputs), atol=1e-5, rtol=1e-4)


RELOAD = """
import json, sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel
for job in json.loads(sys.argv[1]):
    model = AutoModel.from_pretrained(job["folder"]).eval()
    with torch.no_grad():
        out = model(**load_file(job["inputs"]))
    out = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    save_file({"out": out.contiguous()}, job["result"])
assert not any(name.split(".")[0] == "reshape" for name in sys.modules), "reshape was imported"
"""


@pytest.mark.slow
def test_every_covered_type_reloads_with_plain_transformers(tmp_path):
    jobs, expected = [], {}
    for model_type in sorted(COVERED):
        model = tiny_model(model_type)
        source = tmp_path / f"{model_type}-source"
        model.save_pretrained(source)
        out = tmp_path / model_type
        reshape.convert(str(source), out, **plan_of(model_type, model))
        inputs = tiny_inputs(model)
        save_file(inputs, tmp_path / f"{model_type}-inputs.safetensors")
        with torch.no_grad():
            expected[model_type] = output(reshape.load(out), inputs)
        jobs.append({"folder": str(out), "inputs": str(tmp_path / f"{model_type}-inputs.safetensors"),
                     "result": str(tmp_path / f"{model_type}-out.safetensors")})
    subprocess.run([sys.executable, "-c", RELOAD, json.dumps(jobs)], check=True, cwd=tmp_path)
    for model_type, job in zip(sorted(COVERED), jobs):
        torch.testing.assert_close(load_file(job["result"])["out"], expected[model_type], msg=model_type)


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_types_reshape_cannot_rebuild_are_refused_in_one_line(model_type):
    with pytest.raises(ReshapeError, match=REFUSED[model_type]) as e:
        reshape.leaner(tiny_model(model_type), heads=8)
    assert "\n" not in str(e.value)


# --- per-head rules -------------------------------------------------------------------------------


def test_relative_position_bias_tables_follow_their_parent_heads():
    # BEiT keeps a table per layer, heads last; MPNet one shared table outside the stack.
    for model_type, key in (("beit", "layers.{}.relative_position_bias.relative_position_bias_table"),
                            ("mpnet", "encoder.relative_attention_bias.weight")):
        model = tiny_model(model_type)
        new = reshape.leaner(model, heads=8, keep=[0, 5])
        old, now = model.state_dict(), new.state_dict()
        for new_index, old_index in enumerate([0, 5]):
            before, after = old[key.format(old_index)], now[key.format(new_index)]
            assert after.shape == (before.shape[0], 8)
            # Child head j of 8 at the same width lies inside parent head j // 2 of 4.
            assert torch.equal(after, before[:, [j // 2 for j in range(8)]]), model_type


def test_attention_sinks_follow_their_parent_heads():
    model = tiny_model("gpt_oss")  # one learnt sink logit per head
    new = reshape.leaner(model, heads=8, keep=[0, 5])
    for new_index, old_index in enumerate([0, 5]):
        before = model.state_dict()[f"layers.{old_index}.self_attn.sinks"]
        assert torch.equal(new.state_dict()[f"layers.{new_index}.self_attn.sinks"], before[[j // 2 for j in range(8)]])


def test_t5_relative_attention_bias_follows_its_parent_heads_in_both_stacks():
    model = tiny_model("t5")
    new = reshape.leaner(model, heads=[8, 8], depth=[3, 2])
    old, now = model.state_dict(), new.state_dict()
    for stack in ("encoder", "decoder"):
        key = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        assert torch.equal(now[key], old[key][:, [j // 2 for j in range(8)]])
    assert new.config.d_kv == 8 and (new.config.num_layers, new.config.num_decoder_layers) == (3, 2)
    with pytest.raises(ReshapeError, match="heads=8,4: differs between the stacks.*one head count \\(num_heads\\)"):
        reshape.leaner(model, heads=[8, 4], depth=[3, 2])
    with pytest.raises(ReshapeError, match="drops a stack's first block"):
        reshape.leaner(model, heads=[8, 8], depth=[3, 2], select="last")


def test_encoder_decoder_stacks_take_their_own_heads_and_depth():
    model = tiny_model("bart")
    new = reshape.leaner(model, heads=[8, 2], depth=[2, 4], allow_fewer_heads=True)
    assert (new.config.encoder_attention_heads, new.config.decoder_attention_heads) == (8, 2)
    assert (len(new.encoder.layers), len(new.decoder.layers)) == (2, 4)
    # Kept blocks keep their weights: the decoder's cross-attention included (its heads are re-read).
    keep = reshape.select_layers(6, 4, "uniform")
    for new_index, old_index in enumerate(keep):
        for name, tensor in model.decoder.layers[old_index].state_dict().items():
            assert torch.equal(new.decoder.layers[new_index].state_dict()[name], tensor), name
    with pytest.raises(ReshapeError, match="heads=8: is a single number, and auto:bart has 2 stages"):
        reshape.leaner(model, heads=8, depth=[2, 4])


def test_albert_depth_sets_the_repeat_count_of_its_shared_layer():
    model = tiny_model("albert")
    new = reshape.leaner(model, heads=8, depth=4)
    assert new.config.num_hidden_layers == 4
    for name, tensor in model.state_dict().items():  # keep-width: every shared weight stays as it was
        assert torch.equal(new.state_dict()[name], tensor), name
    # The function is the source's shared layer run 4 times, at 8 heads.
    config = copy.deepcopy(model.config)
    config.num_hidden_layers, config.num_attention_heads = 4, 8
    same = type(model)(config).eval()
    same.load_state_dict(model.state_dict())
    inputs = tiny_inputs(model)
    torch.testing.assert_close(output(new, inputs), output(same, inputs))


def test_qk_norms_over_the_head_dim_refuse_keep_width_and_stay_with_keep_head_dim():
    model = tiny_model("qwen3")
    with pytest.raises(ReshapeError, match=r"q/k norms \(self_attn.q_norm, self_attn.k_norm\).*--keep-head-dim"):
        reshape.leaner(model, heads=8, depth=4)
    wide = reshape.leaner(model, heads=8, depth=6, keep_head_dim=True)
    assert torch.equal(wide.state_dict()["layers.0.self_attn.q_norm.weight"],
                       model.state_dict()["layers.0.self_attn.q_norm.weight"])


def test_moe_experts_are_copied_unchanged_and_mlp_is_refused():
    model = tiny_model("mixtral")
    new = reshape.leaner(model, heads=8, keep=[1, 4], keep_head_dim=True)
    old, now = model.state_dict(), new.state_dict()
    for name in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"):
        assert torch.equal(now[f"layers.1.{name}"], old[f"layers.4.{name}"])
    with pytest.raises(ReshapeError, match="mlp=48: would slice the experts"):
        reshape.leaner(model, heads=8, mlp=48)


def test_a_first_block_unlike_the_others_must_be_kept():
    # ModernBERT's layer 0 has no attention norm (the embeddings end in one): no later layer can replace it.
    with pytest.raises(ReshapeError, match="keep=1,2,5: drops layer 0, whose block differs .*attn_norm"):
        reshape.leaner(tiny_model("modernbert"), heads=8, keep=[1, 2, 5])
    # Layers picked by importance obey the same rule (scores that rank layer 0 last).
    with mock.patch("reshape.pipeline.layer_scores", return_value=[0.0, 1, 2, 3, 4, 5]), \
            pytest.raises(ReshapeError, match="keep=1,2,3,4,5: drops layer 0, whose block differs"):
        reshape.leaner(tiny_model("modernbert"), heads=8, depth=5, select="importance")


@pytest.mark.parametrize("model_type,key", [("gpt_neox", "layers.{}.attention.query_key_value.weight"),
                                            ("bloom", "h.{}.self_attention.query_key_value.weight")])
def test_interleaved_fused_qkv_keeps_each_role_in_place(model_type, key):
    """GPT-NeoX and BLOOM store fused rows per head as [q_h, k_h, v_h]. Re-read at 8 heads (keep-width),
    the query, key and value matrices must be the same matrices, split into narrower heads."""
    model = tiny_model(model_type)
    new = reshape.leaner(model, heads=8, keep=[0, 2], head_split="contiguous")

    def roles(weight, heads):  # [heads, 3, head_dim, in] -> q, k, v as [width, in]
        return [weight.view(heads, 3, -1, weight.shape[-1])[:, r].reshape(-1, weight.shape[-1]) for r in range(3)]

    for new_index, old_index in enumerate([0, 2]):
        before = roles(model.state_dict()[key.format(old_index)], 4)
        after = roles(new.state_dict()[key.format(new_index)], 8)
        for b, a in zip(before, after):
            assert torch.equal(a, b)


def test_grouped_fused_qkv_keeps_each_role_in_place():
    """Falcon's new layout groups rows per KV head: [q heads of the group, k, v]."""
    model = tiny_model("falcon")  # 4 heads, 2 KV heads
    new = reshape.leaner(model, heads=8, keep=[0, 2], head_split="contiguous")  # 8 heads, 4 KV heads

    def roles(weight, kv):  # rows as [kv, 2 query heads + k + v, head_dim]
        groups = weight.view(kv, 4, -1, weight.shape[-1])
        q = groups[:, :2].reshape(-1, weight.shape[-1])
        return q, groups[:, 2].reshape(-1, weight.shape[-1]), groups[:, 3].reshape(-1, weight.shape[-1])

    key = "h.{}.self_attention.query_key_value.weight"
    for new_index, old_index in enumerate([0, 2]):
        for b, a in zip(roles(model.state_dict()[key.format(old_index)], 2),
                        roles(new.state_dict()[key.format(new_index)], 4)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("model_type", ["gemma2", "modernbert", "gpt_neo"])
def test_per_layer_config_follows_the_kept_layers(model_type):
    model = tiny_model(model_type)
    new = reshape.leaner(model, heads=8, keep=[0, 2, 5])
    key = "attention_layers" if model_type == "gpt_neo" else "layer_types"
    assert getattr(new.config, key) == [getattr(model.config, key)[i] for i in (0, 2, 5)]
    assert len(set(getattr(new.config, key))) == 2  # the tiny configs alternate two kinds
    inputs = tiny_inputs(model)
    assert output(new, inputs).shape == output(model, inputs).shape


def same_kinds(model, new, keep) -> None:
    """Each kept block is rebuilt as a block of its own kind (dense or mixture-of-experts, ...)."""
    for new_index, old_index in enumerate(keep):
        kind = {n for n, _ in find_family(model).layers(model)[old_index].named_parameters()}
        assert {n for n, _ in find_family(new).layers(new)[new_index].named_parameters()} == kind, new_index


@pytest.mark.parametrize("model_type,config,keep,expected", [
    ("llama4_text", dict(moe_layers=[1, 3, 5]), [0, 1, 4, 5], dict(moe_layers=[1, 3])),
    ("flint", dict(mlp_only_layers=[0, 3]), [1, 2, 3, 5], dict(mlp_only_layers=[2])),
    ("glm4_moe", dict(first_k_dense_replace=2), [1, 2, 3, 5], dict(first_k_dense_replace=1)),
    ("ernie4_5_moe", dict(moe_layer_start_index=2, moe_layer_end_index=4), [0, 1, 3, 5],
     dict(moe_layer_start_index=2, moe_layer_end_index=2)),
    ("laguna", dict(mlp_layer_types=["dense", "dense", "sparse", "sparse", "sparse", "sparse"]), [0, 2, 3, 5],
     dict(mlp_layer_types=["dense", "sparse", "sparse", "sparse"], num_attention_heads_per_layer=[8] * 4)),
])
def test_layer_kinds_follow_the_kept_layers(model_type, config, keep, expected):
    """Which layers are dense and which mixture-of-experts, said as index lists, leading counts, ranges
    or per-layer lists (head counts too): the rebuilt model's layers are the kept layers' kinds."""
    model = tiny_model(model_type, **config)
    new = reshape.leaner(model, heads=8, keep=keep, keep_head_dim=bool(find_family(model).found.head_norms))
    for key, value in expected.items():
        assert getattr(new.config, key) == value, key
    same_kinds(model, new, keep)


def test_an_attention_output_gate_follows_the_query_heads():
    model = tiny_model("afmoe")  # sigmoid(gate_proj(x)) scales each attention output feature
    wide = reshape.leaner(model, heads=8, depth=6, keep_head_dim=True)
    sources = reshape.plan.head_sources(find_family(model).shape(model.config), 8)
    rows = torch.cat([torch.arange(16) + 16 * h for h in sources])
    gate = "layers.0.self_attn.gate_proj.weight"
    assert torch.equal(wide.state_dict()[gate], model.state_dict()[gate][rows])
    inputs = tiny_inputs(model)
    torch.testing.assert_close(output(wide, inputs), output(model, inputs), atol=1e-5, rtol=1e-4)


def test_a_per_head_convolution_follows_its_parent_heads():
    model = tiny_model("nystromformer")  # a depthwise convolution over each head's values
    new = reshape.leaner(model, heads=8, keep=[0, 5], head_split="contiguous")
    for new_index, old_index in enumerate([0, 5]):
        key = "encoder.layer.{}.attention.self.conv.weight"
        before, after = model.state_dict()[key.format(old_index)], new.state_dict()[key.format(new_index)]
        assert after.shape[0] == 8 and torch.equal(after, before[[j // 2 for j in range(8)]])


def test_a_config_without_head_dim_gets_one_where_its_code_reads_it():
    model = tiny_model("apertus")
    assert "head_dim" not in model.config.to_dict()
    wide = reshape.leaner(model, heads=8, depth=4, keep_head_dim=True)
    assert wide.config.to_dict()["head_dim"] == 16  # saved in config.json, so from_pretrained rebuilds it
    assert wide.state_dict()["layers.0.self_attn.q_proj.weight"].shape == (128, 64)
    # A model whose code ignores an added head_dim cannot widen: refused, not built wrong.
    with pytest.raises(ReshapeError, match="config cannot express an attention width different"):
        reshape.leaner(tiny_model("mlcd_vision_model"), heads=8, depth=4, keep_head_dim=True)


def test_blocks_of_another_kind_in_a_hybrid_stack_keep_their_weights():
    model = tiny_model("lfm3")  # convolution blocks between attention blocks
    kinds = model.config.layer_types
    new = reshape.leaner(model, heads=8, keep=[0, 2, 3, 5], keep_head_dim=True)
    assert new.config.layer_types == [kinds[i] for i in (0, 2, 3, 5)]
    same_kinds(model, new, [0, 2, 3, 5])
    for new_index, old_index in enumerate([0, 2, 3, 5]):
        if kinds[old_index] == "conv":
            for name, tensor in model.layers[old_index].state_dict().items():
                assert torch.equal(new.layers[new_index].state_dict()[name], tensor), name


def test_an_encoder_decoders_per_layer_lists_follow_their_stacks_kept_layers():
    model = tiny_model("led", attention_window=[4, 8, 16, 4, 8, 16])  # one window per encoder layer
    new = reshape.leaner(model, heads=[8, 8], depth=[3, 6])
    keep = reshape.select_layers(6, 3, "uniform")
    assert new.config.attention_window == [model.config.attention_window[i] for i in keep]
    inputs = tiny_inputs(model)
    assert output(new, inputs).shape == output(model, inputs).shape
