"""`reshape report`: exact parameter accounting, FLOPs that scale with depth, the κ probe on known answers,
a stable JSON schema, written files, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf

from helpers.cli_in_process import invoke

import reshape
from reshape.conditioning import kappa, layer_conditioning
from reshape.errors import ReshapeError
from reshape.families.hf import BERT
from reshape.reporting import components, flops

D, F, V, P = 32, 64, 50, 16  # width, MLP width, vocabulary, positions


def bert(layers: int, heads: int = 2) -> tf.BertModel:
    torch.manual_seed(0)
    return tf.BertModel(tf.BertConfig(hidden_size=D, num_hidden_layers=layers, num_attention_heads=heads,
                                      intermediate_size=F, vocab_size=V, max_position_embeddings=P)).eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    bert(4).save_pretrained(root / "base")
    reshape.convert(str(root / "base"), root / "leaner", heads=4, depth=2)
    return root


def test_parameters_by_component_match_the_analytic_count():
    L = 3
    counts = components(bert(L), BERT)
    embeddings = (V + P + 2) * D + 2 * D  # word, position, token type tables and their LayerNorm
    assert counts == {
        "total": embeddings + L * (4 * (D * D + D) + 2 * D * F + F + D + 4 * D) + D * D + D,
        "embeddings": embeddings,
        "non_embedding": L * (4 * (D * D + D) + 2 * D * F + F + D + 4 * D) + D * D + D,
        "attention": L * 4 * (D * D + D),
        "mlp": L * (2 * D * F + F + D),
        "block_other": L * 4 * D,
        "head_and_other": D * D + D,  # the pooler
    }


@pytest.mark.parametrize("name", ["convit_tiny", "twins_svt_small"])
def test_blocks_of_two_kinds_are_counted_by_their_own_weight_maps(name):
    """ConViT's GPSA and MHSA blocks, Twins' local and global ones: each kind names other projections."""
    import timm

    from reshape.families import find_family

    model = timm.create_model(name, pretrained=False)
    counts = components(model, find_family(model))
    blocks = [dict(block.named_parameters()) for block in find_family(model).layers(model)]

    def total(prefixes):
        return sum(p.numel() for own in blocks for n, p in own.items() if n.startswith(prefixes))

    attention = ("attn.q.", "attn.kv.", "attn.qkv.", "attn.qk.", "attn.v.", "attn.proj.", "attn.pos_proj.",
                 "attn.gating_param")
    assert counts["attention"] == total(attention)
    assert counts["mlp"] == total(("mlp.",))
    assert counts["block_other"] == total(("norm1.", "norm2.", "attn.sr.", "attn.norm."))


def test_flops_grow_by_the_same_amount_per_layer():
    inputs = {"input_ids": torch.randint(V, (1, 12))}
    f1, f2, f3 = (flops(bert(n), inputs) for n in (1, 2, 3))
    assert f3 - f2 == f2 - f1 > 0


def test_kappa_of_a_gaussian_matrix_is_the_marchenko_pastur_value():
    n, d = 64, 256
    values = [kappa(torch.randn(n, d, generator=torch.Generator().manual_seed(s))) for s in range(5)]
    expected = (math.sqrt(d) + math.sqrt(n)) / (math.sqrt(d) - math.sqrt(n))  # = 3
    assert abs(sum(values) / len(values) - expected) / expected < 0.1
    assert kappa(torch.eye(5)) == pytest.approx(1.0)


def test_identical_heads_are_fully_correlated():
    model = bert(1, heads=4)
    attention = model.encoder.layer[0].attention.self
    with torch.no_grad():
        for proj in (attention.query, attention.key, attention.value):
            for h in range(1, 4):  # every head becomes a copy of head 0
                proj.weight[h * 8:(h + 1) * 8] = proj.weight[:8]
                proj.bias[h * 8:(h + 1) * 8] = proj.bias[:8]
    batches = [{"input_ids": torch.randint(V, (3, 10), generator=torch.Generator().manual_seed(0))}]
    [layer] = layer_conditioning(model, BERT, batches, heads=[4])
    assert layer["head_correlation"] == pytest.approx(1.0)
    assert layer["layer"] == 0 and 1 <= layer["kappa_iqr"][0] <= layer["kappa_median"] <= layer["kappa_iqr"][1]
    assert layer_conditioning(bert(1, heads=4), BERT, batches, heads=[4])[0]["head_correlation"] < 0.9


def test_report_files_schema_and_ratios(pair, tmp_path):
    result = reshape.report(pair / "base", pair / "leaner", batch_sizes=(1, 2), seq_len=8, repeats=2,
                            out=tmp_path / "report")
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["kappa.png", "report.json", "report.md"]
    assert all(p.stat().st_size > 0 for p in (tmp_path / "report").iterdir())
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert set(saved) == {"schema", "base", "leaner", "family", "threads", "seq_len", "device", "models", "ratios",
                          "notes"}
    base, leaner = saved["models"]["base"], saved["models"]["leaner"]
    assert set(base) == {"shape", "params", "flops_per_sample", "latency", "memory", "conditioning"}
    assert set(base["latency"]) == {"1", "2"} and len(base["conditioning"]) == 4 and len(leaner["conditioning"]) == 2
    assert saved["ratios"]["params.attention"] == round(leaner["params"]["attention"] / base["params"]["attention"], 4)
    assert saved["ratios"]["params.attention"] == 0.5  # 2 of 4 layers, same width
    assert base["memory"]["train_step_mib"] > base["memory"]["inference_mib"] > 0
    assert "| FLOPs per sample |" in (tmp_path / "report" / "report.md").read_text()



def test_a_report_inside_the_leaner_folder_joins_its_model_card(pair, tmp_path):
    import shutil

    leaner = shutil.copytree(pair / "leaner", tmp_path / "leaner")
    assert "| FLOPs per sample |" not in (leaner / "README.md").read_text()
    reshape.report(pair / "base", leaner, batch_sizes=(1,), seq_len=8, repeats=1, kappa=False, out=leaner / "report")
    assert "| FLOPs per sample |" in (leaner / "README.md").read_text()

@pytest.mark.parametrize("kwargs, message", [
    (dict(seq_len=64), "seq_len=64: exceeds the 16 positions the models take; use at most 16"),
    (dict(data="rotten-tomatoes"), "task=None: is needed with --data"),
    (dict(batch_sizes=(0,)), "batch_sizes=0: must be at least 1; use e.g. --batch-sizes 1,32"),
])
def test_bad_report_input(pair, kwargs, message):
    with pytest.raises(ReshapeError, match=message.replace("(", r"\(")):
        reshape.report(pair / "base", pair / "leaner", **kwargs)


def test_report_refuses_another_family_and_a_full_output_folder(pair, tmp_path):
    tf.GPT2Model(tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ReshapeError, match="is a gpt2 model but the base is bert"):
        reshape.report(pair / "base", tmp_path / "gpt2")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ReshapeError, match="out="):
        reshape.report(pair / "base", pair / "leaner", out=tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_cli_report_json(pair):  # in this process; tests/test_cli_smoke.py runs `reshape report` as one
    done = invoke("report", pair / "base", pair / "leaner", "--batch-sizes", "1", "--seq-len", "8", "--repeats", "1",
                  "--no-kappa", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ratios"]["flops_per_sample"] < 1 and "conditioning" not in result["models"]["base"]


def test_report_with_data_scores_both_and_plots_quality(pair, tmp_path):
    rows = "".join(f"the film was {w},{int(w == 'good')}\n" for w in ["good", "bad"] * 10)
    (tmp_path / "reviews.csv").write_text("text,label\n" + rows)
    result = reshape.report(pair / "base", pair / "leaner", data=str(tmp_path / "reviews.csv"), task="seq-cls",
                            batch_sizes=(1,), seq_len=8, repeats=1, out=tmp_path / "report")
    for name in ("base", "leaner"):
        assert set(result["models"][name]["quality"]) == {"validation", "test"}
        assert result["models"][name]["quality"]["validation"]["split"] == "validation"
        assert set(result["models"][name]["quality"]["test"]) >= {"accuracy", "f1"}
    assert {"quality.validation.accuracy", "quality.test.accuracy"} <= set(result["ratios"])
    assert (tmp_path / "report" / "quality_vs_params.png").stat().st_size > 0
    assert "conditioning measured on random inputs" not in " ".join(result["notes"])
