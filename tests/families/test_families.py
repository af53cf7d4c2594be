"""Every family, on tiny models built in code: equivalence, exact weights, exact parameter counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.cases import CASES, by_id, case_params, first_output

import reshape
from reshape.errors import ReshapeError
from reshape.families import find_family
from reshape.stages import StagedShape
from reshape.streaming import layers_prefix
from reshape.testing import tiny_config


def family_of(model):
    return find_family(model)


def shape_of(model):
    family = family_of(model)
    return family.shape(family.spec(model).config)


def layer_state(model, index: int) -> dict[str, torch.Tensor]:
    return family_of(model).layers(model)[index].state_dict()


@pytest.mark.parametrize("config", [
    {"architecture": "vit_tiny_patch16_224", "model_args": {}}, {"architecture": "davit_tiny", "model_args": {}},
    {"architecture": "swin_tiny_patch4_window7_224", "model_args": {}},
    {"architecture": "twins_svt_small", "model_args": {}}, "bert", "t5"], ids=str)
def test_a_family_is_staged_exactly_when_its_shape_has_stages(config):
    config = tiny_config(config) if isinstance(config, str) else config
    family = find_family(config)
    assert family.staged == isinstance(family.shape(config), StagedShape)
    assert family.staged == (family.name in ("timm-davit", "timm-swin", "timm-twins", "auto:t5"))


@pytest.mark.parametrize("case", case_params())
def test_noop_plan_reproduces_outputs(case):
    model = case.model()
    shape = shape_of(model)
    same = reshape.leaner(model, heads=shape.heads, depth=shape.layers)
    torch.testing.assert_close(first_output(same, case.inputs()), first_output(model, case.inputs()))


@pytest.mark.parametrize("case", case_params())
def test_keep_width_copies_kept_layers_bit_for_bit(case):
    model = case.model()
    new = reshape.leaner(model, heads=case.heads, keep=[0, 3], head_split="contiguous")
    assert shape_of(new).heads == case.heads and shape_of(new).layers == 2
    for new_index, old_index in enumerate([0, 3]):
        old, now = layer_state(model, old_index), layer_state(new, new_index)
        assert old.keys() == now.keys()
        for key in old:
            assert torch.equal(old[key], now[key]), key
    # Everything outside the block stack (embeddings, final norm, task head) is kept as well.
    prefix = layers_prefix(new, family_of(new))
    outside = {k: v for k, v in new.state_dict().items() if not k.startswith(prefix)}
    source = model.state_dict()
    assert outside and all(torch.equal(v, source[k]) for k, v in outside.items())
    assert first_output(new, case.inputs()).shape == first_output(model, case.inputs()).shape


@pytest.mark.parametrize("case", case_params([c for c in CASES if c.widen_heads]))
def test_keep_head_dim_is_function_preserving(case):
    model = case.model()
    shape = shape_of(model)
    wide = reshape.leaner(model, heads=case.widen_heads, keep_head_dim=True)
    new_shape = shape_of(wide)
    assert (new_shape.heads, new_shape.head_dim) == (case.widen_heads, shape.head_dim)
    torch.testing.assert_close(first_output(wide, case.inputs()), first_output(model, case.inputs()))
    # With fewer layers too, it matches the same depth cut at the original head count.
    cut = reshape.leaner(model, heads=shape.heads, depth=2)
    wide_cut = reshape.leaner(model, heads=case.widen_heads, depth=2, keep_head_dim=True)
    torch.testing.assert_close(first_output(wide_cut, case.inputs()), first_output(cut, case.inputs()))


@pytest.mark.parametrize("case", case_params([c for c in CASES if c.id in ("bert-model", "gpt2-model", "timm-vit")]))
def test_keep_head_dim_refused_where_the_config_cannot_express_it(case):
    with pytest.raises(ReshapeError, match="head_mode=keep-head-dim.*keep-width"):
        reshape.leaner(case.model(), heads=8, keep_head_dim=True)


@pytest.mark.parametrize("case", case_params([by_id(i) for i in ("bert-model", "gpt2-lm", "llama-lm", "timm-vit")]))
def test_mlp_keeps_the_neurons_with_the_largest_norms(case):
    model = case.model()
    weights = family_of(model).weights
    new = reshape.leaner(model, heads=case.heads, depth=4, mlp=40)
    assert shape_of(new).mlp == 40
    old, now = layer_state(model, 1), layer_state(new, 1)
    axis = 1 if weights.mlp_out.conv1d else 0  # output axis of the MLP's input projections
    w_in = old[f"{weights.mlp_in[0].name}.weight"]
    w_out = old[f"{weights.mlp_out.name}.weight"]
    score = w_out.norm(dim=axis)  # per neuron: the output projection's column norm ...
    for proj in weights.mlp_in:
        score = score * old[f"{proj.name}.weight"].norm(dim=1 - axis)  # ... times each input row norm
    keep = score.topk(40).indices.sort().values
    torch.testing.assert_close(now[f"{weights.mlp_in[0].name}.weight"], w_in.index_select(axis, keep), rtol=0, atol=0)
    torch.testing.assert_close(now[f"{weights.mlp_out.name}.weight"], w_out.index_select(1 - axis, keep), rtol=0, atol=0)


def test_leaner_leaves_its_input_untouched():
    model = by_id("bert-seqcls").model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = reshape.leaner(model, heads=8, depth=2, mlp=48)
    assert type(new) is type(model)
    assert model.config.num_attention_heads == 4 and model.config.num_hidden_layers == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        for p in new.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tied_embeddings_stay_tied():
    gpt2 = reshape.leaner(by_id("gpt2-lm").model(), heads=8, depth=2)
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    llama = reshape.leaner(by_id("llama-tied-lm").model(), heads=8, depth=2)
    assert llama.lm_head.weight is llama.model.embed_tokens.weight


def test_per_layer_config_follows_the_kept_layers():
    model = by_id("qwen2-lm").model()  # qwen2: full, full, sliding, sliding
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    new = reshape.leaner(model, heads=8, keep=[0, 2, 3])
    assert new.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert [layer.self_attn.layer_idx for layer in new.model.layers] == [0, 1, 2]


def test_gqa_keep_width_scales_kv_heads_and_keeps_shapes():
    model = by_id("llama-lm").model()  # llama 4 heads, 2 KV heads, head dim 16
    new = reshape.leaner(model, heads=8, depth=4)
    assert (new.config.num_attention_heads, new.config.num_key_value_heads, new.config.head_dim) == (8, 4, 8)
    attn = new.model.layers[0].self_attn
    assert (attn.num_key_value_groups, attn.head_dim) == (2, 8)


def test_random_init_is_fresh_and_seeded():
    model = by_id("bert-seqcls").model()
    a = reshape.leaner(model, heads=8, depth=2, init="random", seed=3)
    b = reshape.leaner(model, heads=8, depth=2, init="random", seed=3)
    c = reshape.leaner(model, heads=8, depth=2, init="random", seed=4)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], model.state_dict()[key])
    assert a.state_dict()[key].shape == model.state_dict()[key].shape


def test_unsupported_model_lists_the_families():
    with pytest.raises(ReshapeError) as e:
        reshape.leaner(torch.nn.Linear(4, 4))
    message = str(e.value)
    assert message.startswith("model=Linear: is not a supported model family")
    for name in ("BERT", "RoBERTa", "ViT", "GPT-2", "LLaMA", "timm VisionTransformer"):
        assert name in message


def test_leaner_without_a_plan_uses_the_rule_of_thumb(caplog):
    new = reshape.leaner(by_id("bert-model").model())  # width 64, 4 heads, 4 layers
    assert (new.config.num_attention_heads, new.config.num_hidden_layers) == (8, 3)
    assert "rule of thumb" in caplog.text


# --- exact parameter counts against an independent analytic count ---------------------------------

def _blocks(layers, d_model, attn_width, kv_width, mlp, bias=True, gated=False, norms=2, norm_params=2):
    """Parameters of `layers` pre/post-norm transformer blocks."""
    attn = d_model * attn_width + 2 * d_model * kv_width + attn_width * d_model
    mlp_params = (3 if gated else 2) * d_model * mlp
    if bias:
        attn += attn_width + 2 * kv_width + d_model
        mlp_params += mlp + d_model
    return layers * (attn + mlp_params + norms * norm_params * d_model)


def expected_params(case_id, L, H, kv, d, F):
    D = 64
    if case_id == "bert-seqcls":  # embeddings (word, position, type, LN) + pooler + classifier
        return 100 * D + 32 * D + 2 * D + 2 * D + _blocks(L, D, H * d, H * d, F) + D * D + D + D * 3 + 3
    if case_id == "vit-imgcls":  # cls + positions + patch conv, final norm, classifier
        return D + 17 * D + 3 * 4 * 4 * D + D + _blocks(L, D, H * d, H * d, F) + 2 * D + D * 4 + 4
    if case_id == "gpt2-lm":  # wte (tied with lm_head) + wpe, final norm
        return 100 * D + 32 * D + _blocks(L, D, H * d, H * d, F) + 2 * D
    if case_id in ("llama-lm", "mistral-lm"):  # embeddings + untied lm_head, RMSNorms have no bias
        return 2 * 100 * D + _blocks(L, D, H * d, kv * d, F, bias=False, gated=True, norm_params=1) + D
    if case_id == "timm-vit":
        return D + 17 * D + 3 * 4 * 4 * D + D + _blocks(L, D, H * d, H * d, F) + 2 * D + D * 5 + 5
    raise KeyError(case_id)


COUNT_CASES = [c for c in CASES if c.id in ("bert-seqcls", "vit-imgcls", "gpt2-lm", "llama-lm", "mistral-lm",
                                              "timm-vit")]


@pytest.mark.parametrize("case", case_params(COUNT_CASES))
def test_parameter_counts_match_the_analytic_count(case):
    model = case.model()
    s = shape_of(model)
    count = reshape.summary.count_params
    assert count(model, family_of(model))["total"] == expected_params(case.id, s.layers, s.heads, s.kv_heads,
                                                                      s.head_dim, s.mlp)
    new = reshape.leaner(model, heads=8, depth=2, mlp=48)
    n = shape_of(new)
    assert (n.layers, n.heads, n.mlp) == (2, 8, 48)
    assert count(new, family_of(new))["total"] == expected_params(case.id, 2, 8, n.kv_heads, n.head_dim, 48)
    if case.widen_heads:
        wide = reshape.leaner(model, heads=8, depth=2, keep_head_dim=True)
        w = shape_of(wide)
        assert (w.heads, w.kv_heads, w.head_dim) == (8, s.kv_heads, s.head_dim)
        assert count(wide, family_of(wide))["total"] == expected_params(case.id, 2, 8, w.kv_heads, w.head_dim, s.mlp)


# --- saved folders load without reshape and reproduce the in-memory model ---------------------------

RELOAD = """
import json, sys
from safetensors.torch import load_file, save_file
import torch
for job in json.loads(sys.argv[1]):
    inputs = load_file(job["inputs"])
    if job["library"] == "timm":
        import timm
        model = timm.create_model("local-dir:" + job["folder"], pretrained=True).eval()
        out = model(inputs["pixel_values"])
    else:
        import transformers
        model = getattr(transformers, job["class"]).from_pretrained(job["folder"]).eval()
        with torch.no_grad():
            out = model(**inputs)[0]
    save_file({"out": out.detach().contiguous()}, job["result"])
assert not any(name.split(".")[0] == "reshape" for name in sys.modules), "reshape was imported"
"""


def save_source(model, folder: Path) -> None:
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder)
    else:
        from timm.models import save_for_hf

        save_for_hf(model, folder, safe_serialization=True)


@pytest.mark.slow
def test_saved_folders_load_without_reshape_and_match(tmp_path):
    jobs, expected = [], {}
    for case in CASES:
        model = case.model()
        source = tmp_path / f"{case.id}-source"
        save_source(model, source)
        plan = dict(heads=case.heads, depth=2, mlp=48)
        if case.widen_heads:
            plan = dict(heads=case.widen_heads, depth=3, keep_head_dim=True)
        out = tmp_path / case.id
        recipe = reshape.convert(str(source), out, **plan)
        assert json.loads((out / "reshape.json").read_text()) == recipe
        assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
        expected[case.id] = first_output(reshape.leaner(model, **plan), case.inputs())
        inputs = tmp_path / f"{case.id}-inputs.safetensors"
        save_file(case.inputs(), inputs)
        library = family_of(model).library
        jobs.append({"folder": str(out), "class": type(model).__name__, "library": library,
                     "inputs": str(inputs), "result": str(tmp_path / f"{case.id}-out.safetensors")})
    subprocess.run([sys.executable, "-c", RELOAD, json.dumps(jobs)], check=True, cwd=tmp_path)
    for case, job in zip(CASES, jobs):
        torch.testing.assert_close(load_file(job["result"])["out"], expected[case.id], msg=case.id)
