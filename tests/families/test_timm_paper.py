"""The paper's timm families (XCiT, DaViT, TNT, DeiT): its published parameter counts, and conversions of
tiny random-weight variants (outputs, exact counts, saved folders, bad input).

The counts are read by `reshape.inspect` from timm architecture names on the meta device: no weights,
no downloads.
"""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from torch import nn

from helpers.cli_in_process import invoke as run_cli  # in this process; tests/test_cli_smoke.py runs processes
from helpers.cli_subprocess import assert_ok, assert_refused
from helpers.timm_outputs import params, run

import reshape
from reshape.errors import ReshapeError
from reshape.families import find_family



def counts(name, **plan) -> tuple[int, int]:
    report = reshape.inspect(name, **plan)
    return report["source"]["params"]["total"], report["result"]["params"]["total"]


def millions(n: int) -> float:
    return round(n / 1e6, 1)


# --- the published parameter counts (PAPER.md, results table) --------------------------------------

@pytest.mark.parametrize("name, plan, exact, published", [
    ("xcit_large_24_p16_224", dict(heads=24, depth=12), (189_096_136, 103_792_744), (189.1, 103.8)),
    ("davit_large", dict(depth=[1, 1, 5, 1]), (196_811_752, 139_985_896), (196.8, 140.0)),
    # The paper reports 62.0M; 5 of 9 stage-3 blocks give 62.7M (each block is 6,325,248 parameters).
    ("davit_base", dict(depth=[1, 1, 5, 1]), (87_954_408, 62_653_416), (88.0, 62.7)),
    # 8 x 16 alone; the paper's 30.9M also halves the outer MLP (2560 -> 1280).
    ("tnt_b_patch16_224", dict(heads=16, depth=8), (65_428_680, 44_015_240), (65.4, 44.0)),
    ("tnt_b_patch16_224", dict(heads=16, depth=8, mlp=1280), (65_428_680, 30_897_800), (65.4, 30.9)),
    # Keep-width; the paper's 59.0M keeps the head dim (attention width 1024, through WideXCA).
    ("xcit_medium_24_p16_224", dict(heads=16, depth=12), (84_395_752, 46_401_256), (84.4, 46.4)),
    ("xcit_medium_24_p16_224", dict(heads=16, depth=12, keep_head_dim=True), (84_395_752, 59_002_600), (84.4, 59.0)),
], ids=["xcit-l", "davit-l", "davit-b", "tnt-b", "tnt-b-mlp-halved", "xcit-m-keep-width", "xcit-m"])
def test_paper_parameter_counts(name, plan, exact, published):
    found = counts(name, **plan)
    assert found == exact
    assert tuple(map(millions, found)) == published


def test_presets_cite_the_paper_and_reproduce_its_rows():
    from reshape.presets import load_presets

    presets = load_presets()
    for alias, total in (("xcit-large", 103_792_744), ("davit-base", 62_653_416), ("tnt-base", 30_897_800),
                         ("xcit-medium", 59_002_600)):
        p = presets[alias]
        assert "2505.20802" in p.source
        report = reshape.inspect(alias, heads=p.heads, depth=p.depth, mlp=p.mlp, keep_head_dim=p.keep_head_dim)
        assert report["result"]["params"]["total"] == total


# --- tiny random-weight variants ---------------------------------------------------------------------

def xcit():
    return timm.create_model("xcit_nano_12_p16_224", pretrained=False, img_size=32, depth=4, num_classes=5)


def davit():
    return timm.create_model("davit_tiny", pretrained=False, depths=(1, 1, 3, 1), embed_dims=(16, 32, 64, 128),
                             num_heads=(1, 2, 4, 8), window_size=2, num_classes=5)


def swin():
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=2, embed_dim=16,
                             depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), num_classes=5)


def tnt():
    return timm.create_model("tnt_s_patch16_224", pretrained=False, img_size=32, depth=4, embed_dim=96,
                             num_classes=5)


def deit():
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, depth=4, num_classes=5)


def deit_distilled():
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, depth=4, num_classes=5)


def make(build) -> nn.Module:
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():  # timm initialises norms, biases and scales to constants: randomise every weight
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


# (build, the plan that keeps everything, a heads/depth plan, timm's own args for that result)
CASES = {
    "xcit": (xcit, dict(heads=4, depth=4), dict(heads=8, depth=2), dict(num_heads=8, depth=2)),
    "davit": (davit, dict(depth=[1, 1, 3, 1]), dict(heads=[2, 4, 8, 16], depth=[1, 1, 2, 1]),
              dict(num_heads=(2, 4, 8, 16), depths=(1, 1, 2, 1))),
    "swin": (swin, dict(depth=[2, 2, 2, 2]), dict(heads=[2, 4, 8, 16], depth=[1, 1, 2, 1]),
             dict(num_heads=(2, 4, 8, 16), depths=(1, 1, 2, 1))),
    "tnt": (tnt, dict(heads=6, depth=4), dict(heads=12, depth=2, inner_heads=6, force=True, mlp=192),
            dict(num_heads_outer=12, depth=2, num_heads_inner=6, mlp_ratio=2)),
    "deit": (deit, dict(heads=3, depth=4), dict(heads=6, depth=2), dict(num_heads=6, depth=2)),
    "deit-distilled": (deit_distilled, dict(heads=3, depth=4), dict(heads=6, depth=2), dict(num_heads=6, depth=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_keeping_every_layer_and_head_reproduces_the_source(case):
    build, same, _, _ = CASES[case]
    model = make(build)
    assert torch.equal(run(reshape.leaner(model, **same)), run(model))


@pytest.mark.parametrize("case", list(CASES))
def test_converted_model_has_timms_own_shape_and_count_and_reloads(case, tmp_path):
    build, _, plan, timm_args = CASES[case]
    model = make(build)
    new = reshape.leaner(model, **plan)
    assert type(new) is type(model)
    assert run(new).shape == (2, 5)
    args = {**find_family(model).spec(model).config["model_args"], **timm_args}
    assert params(new) == params(timm.create_model(model.pretrained_cfg["architecture"], pretrained=False, **args))
    family = find_family(new)
    family.save(new, family.spec(new), tmp_path / "out")
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert torch.equal(run(reloaded), run(new))


def kept_by_hand(model, keep):
    """The source with only these blocks, cut by hand."""
    cut = copy.deepcopy(model)
    stages = getattr(cut, "stages", None) or getattr(cut, "layers", None)  # DaViT, Swin
    if stages is not None:  # keep[i] are the kept blocks of stage i
        for stage, kept in zip(stages, keep):
            stage.blocks = nn.Sequential(*[stage.blocks[i] for i in kept])
    else:
        blocks = [cut.blocks[i] for i in keep]
        cut.blocks = nn.Sequential(*blocks) if isinstance(cut.blocks, nn.Sequential) else nn.ModuleList(blocks)
    return cut


@pytest.mark.parametrize("case, depth, keep", [
    ("xcit", 2, [0, 3]), ("tnt", 3, [0, 2, 3]), ("deit", 2, [0, 3]), ("deit-distilled", 3, [0, 2, 3]),
    ("davit", [1, 1, 2, 1], [[0], [0], [0, 2], [0]]), ("swin", [1, 2, 1, 2], [[0], [0, 1], [0], [0, 1]]),
])
def test_depth_only_equals_the_kept_blocks_run_by_hand(case, depth, keep):
    build, same, _, _ = CASES[case]
    model = make(build)
    new = reshape.leaner(model, heads=same.get("heads"), depth=depth)
    assert torch.equal(run(new), run(kept_by_hand(model, keep)))


def test_xcit_new_heads_inherit_their_parent_heads_temperature():
    model = make(xcit)
    new = reshape.leaner(model, heads=8, depth=4)  # 4 heads of 32 channels -> 8 of 16: parent of head j is j // 2
    for old, now in zip(model.blocks, new.blocks):
        assert now.attn.temperature.shape == (8, 1, 1)
        assert torch.equal(now.attn.temperature, old.attn.temperature.repeat_interleave(2, dim=0))
        assert torch.equal(now.attn.qkv.weight, old.attn.qkv.weight)  # keep-width: the same weights, re-read
    # 4 -> 16/3 is no whole head dim; 4 -> 16 heads of 8: parent j // 4. Class attention follows num_heads.
    sixteen = reshape.leaner(model, heads=16, depth=1)
    assert torch.equal(sixteen.blocks[0].attn.temperature, model.blocks[0].attn.temperature.repeat_interleave(4, 0))
    assert sixteen.cls_attn_blocks[0].attn.num_heads == 16


def test_xcit_keep_head_dim_widens_the_attention_and_keeps_each_block_exact():
    """4 heads of 32 -> 8 heads of 32 (attention width 256 in a 128-wide model): each new head copies a
    source head's q/k/v rows and temperature, and proj's columns are halved, so every main block computes
    what it did. The class-attention blocks keep their weights, re-read as 8 heads (as with keep-width)."""
    model = make(xcit)
    new = reshape.leaner(model, heads=8, depth=4, keep_head_dim=True)
    tokens = torch.randn(2, 4, 128, generator=torch.Generator().manual_seed(1))  # a 2 x 2 patch grid
    for old, now in zip(model.blocks, new.blocks):
        assert (now.attn.num_heads, now.attn.head_dim) == (8, 32)
        assert now.attn.qkv.weight.shape == (3 * 256, 128) and now.attn.proj.weight.shape == (128, 256)
        assert torch.equal(now.attn.temperature, old.attn.temperature.repeat_interleave(2, dim=0))
        with torch.no_grad():
            torch.testing.assert_close(now(tokens, 2, 2), old(tokens, 2, 2), rtol=0, atol=1e-5)
    wider = 3 * 128 * 128 + 3 * 128 + 128 * 128  # qkv weight + bias, proj weight, per block
    assert params(new) == params(model) + 4 * (wider + 4)  # + 4 more temperatures per block
    assert new.cls_attn_blocks[0].attn.num_heads == 8
    report = reshape.inspect(model, heads=8, depth=2, keep_head_dim=True)
    assert report["result"]["shape"]["head_dim"] == 32
    assert report["result"]["params"]["total"] == params(model) + 4 * (wider + 4) - 2 * sum(
        p.numel() for p in new.blocks[0].parameters())


def test_xcit_keep_head_dim_folder_loads_with_reshape_not_timm(tmp_path, caplog):
    model = make(xcit)
    family = find_family(model)
    family.save(model, family.spec(model), tmp_path / "src")
    recipe = reshape.convert(tmp_path / "src", tmp_path / "out", heads=8, depth=2, keep_head_dim=True)
    assert "out will need reshape.load (or reshape finetune/eval/report) to load: timm alone cannot build its " \
           "attention (attn_head_dim=32)" in caplog.text
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["attn_head_dim"] == 32 and config["model_args"]["num_heads"] == 8
    assert recipe["plan"]["head_mode"] == "keep-head-dim" and recipe["shape"]["head_dim"] == 32
    loaded = reshape.load(tmp_path / "out")
    assert params(loaded) == recipe["params"]["result"]["total"]
    expected = reshape.leaner(model, heads=8, depth=2, keep_head_dim=True)
    torch.testing.assert_close(run(loaded), run(expected), rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="size mismatch"):  # timm's XCA is as wide as the model
        timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert 'reshape.load("out")' in (tmp_path / "out" / "README.md").read_text()
    with pytest.raises(ReshapeError, match=r"folder=.*out: needs reshape to load \(attn_head_dim in config.json"):
        reshape.push(tmp_path / "out", "someone/xcit", dry_run=True)
    measured = reshape.report(tmp_path / "src", tmp_path / "out", batch_sizes=(2,), repeats=1)
    assert measured["models"]["leaner"]["params"]["total"] == recipe["params"]["result"]["total"]
    assert measured["models"]["leaner"]["shape"]["head_dim"] == 32
    # A fine-tuning run loads it with a fresh head, and saves it with its head dim.
    from reshape.train.timm_task import load_classifier

    classifier = load_classifier(tmp_path / "out", ["a", "b", "c"])
    assert classifier.model.head.out_features == 3
    assert torch.equal(classifier.model.blocks[1].attn.qkv.weight, loaded.blocks[1].attn.qkv.weight)
    classifier.save_pretrained(tmp_path / "tuned")
    assert json.loads((tmp_path / "tuned" / "config.json").read_text())["attn_head_dim"] == 32
    assert params(reshape.load(tmp_path / "tuned")) == params(classifier.model)


def test_swin_keep_head_dim_is_exact_and_reloads_with_plain_timm(tmp_path):
    """Doubled heads per stage at head dim 16: each new head copies a source head's q/k/v rows and its
    relative position bias column, proj's columns are halved, so the whole model computes what it did;
    timm's own head_dim argument expresses the wider attention."""
    model = make(swin)
    new = reshape.leaner(model, heads=[2, 4, 8, 16], keep_head_dim=True)
    torch.testing.assert_close(run(new), run(model), rtol=0, atol=1e-5)
    attn, old = new.layers[2].blocks[1].attn, model.layers[2].blocks[1].attn
    assert attn.qkv.weight.shape == (3 * 8 * 16, 64) and attn.proj.weight.shape == (64, 128)
    assert torch.equal(attn.relative_position_bias_table, old.relative_position_bias_table.repeat_interleave(2, 1))
    family = find_family(new)
    family.save(new, family.spec(new), tmp_path / "out")
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_args"]["head_dim"] == 16
    assert torch.equal(run(reloaded), run(new))


def test_swin_refuses_head_dims_that_differ_between_stages_when_not_keep_width():
    wide = reshape.leaner(make(swin), heads=[2, 4, 8, 16], keep_head_dim=True)  # attention 2x the stage width
    with pytest.raises(ReshapeError, match=r"heads=4,4,8,16: gives head dims \[8, 16\] with the attention wider or "
                                           r"narrower than the stage, and timm's Swin takes one head dim for all "
                                           r"stages; keep the head dim equal in every stage"):
        reshape.leaner(wide, heads=[4, 4, 8, 16])


def test_tnt_outer_heads_split_aware_and_inner_heads_re_read():
    model = make(tnt)
    new = reshape.leaner(model, heads=12, depth=4, inner_heads=6, force=True)
    assert [b.attn_out.num_heads for b in new.blocks] == [12] * 4
    assert [b.attn_in.num_heads for b in new.blocks] == [6] * 4
    old, now = model.blocks[1], new.blocks[1]
    assert not torch.equal(now.attn_out.qk.weight, old.attn_out.qk.weight)  # aware: queries and keys refitted
    assert torch.equal(now.attn_out.v.weight, old.attn_out.v.weight)  # values keep their layout
    assert torch.equal(now.attn_in.qk.weight, old.attn_in.qk.weight)  # inner: the same weights, re-read


def test_distilled_deit_counts_its_distillation_token_as_an_embedding():
    model = make(deit_distilled)
    report = reshape.inspect(model)["source"]["params"]
    assert report["embeddings"] == sum(p.numel() for p in (*model.patch_embed.parameters(), model.pos_embed,
                                                           model.cls_token, model.dist_token))


@pytest.mark.slow
def test_davit_convert_writes_a_staged_recipe_and_a_timm_folder_and_reports(tmp_path):
    model = make(davit)
    family = find_family(model)
    family.save(model, family.spec(model), tmp_path / "src")
    recipe = reshape.convert(tmp_path / "src", tmp_path / "out", depth=[1, 1, 2, 1])
    assert recipe["plan"]["depth"] == [1, 1, 2, 1] and recipe["plan"]["keep"] == [[0], [0], [0, 2], [0]]
    assert recipe["shape"]["layers"] == [1, 1, 2, 1] and recipe["shape"]["heads"] == [1, 2, 4, 8]
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert recipe["params"]["result"]["total"] == params(reloaded)
    assert torch.equal(run(reloaded), run(kept_by_hand(model, [[0], [0], [0, 2], [0]])))
    assert json.loads((tmp_path / "out" / "reshape.json").read_text())["family"] == "timm-davit"
    measured = reshape.report(tmp_path / "src", tmp_path / "out", batch_sizes=(2,), repeats=1, out=tmp_path / "report")
    assert measured["models"]["leaner"]["shape"]["layers"] == [1, 1, 2, 1]
    assert measured["models"]["leaner"]["params"]["total"] == recipe["params"]["result"]["total"]
    assert len(measured["models"]["leaner"]["conditioning"]) == 5  # one κ per dual block, stage by stage
    assert "| layers | 1,1,3,1 | 1,1,2,1 |  |" in (tmp_path / "report" / "report.md").read_text()


# --- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("build, plan, expected", [
    (davit, dict(depth=[1, 1, 2]), "depth=1,1,2: has 3 values, and timm-davit has 4 stages (depth 1,1,3,1); "
                                   "give one per stage, e.g. --depth 1,1,2,1"),
    (davit, dict(depth=2), "depth=2: is a single number, and timm-davit has 4 stages"),
    (davit, dict(heads=[2, 4]), "heads=2,4: has 2 values, and timm-davit has 4 stages (heads 1,2,4,8)"),
    (davit, dict(depth=[1, 1, 5, 1]), "depth[stage 2]=5: must be between 1 and the model's 3 layers"),
    (davit, dict(keep=[0, 1]), "keep=0,1: lists the layers of one block stack, and timm-davit has 4 stages"),
    (davit, dict(depth=[1, 1, 2, 1], mlp=32), "mlp=32: would resize two MLPs per dual block"),
    (swin, dict(depth=[1, 1, 1]), "depth=1,1,1: has 3 values, and timm-swin has 4 stages (depth 2,2,2,2); "
                                  "give one per stage, e.g. --depth 2,2,2,2"),
    (swin, dict(heads=[2, 4, 8, 16], mlp=32), "mlp=32: would resize MLPs in stages of different widths"),
    (deit, dict(depth=[2, 2]), "depth=2,2: gives one number per stage, and timm-vit has a single block stack"),
    (xcit, dict(heads=8, head_split="aware"), "head_split=aware: is not available for timm-xcit"),
    (xcit, dict(heads=8, mlp=64), "mlp=64: would also resize the class-attention blocks' MLPs"),
    (xcit, dict(heads=5), "heads=5: does not divide the attention width 128; use one of 4, 8, 16"),
    (xcit, dict(heads=8, inner_heads=2), "inner_heads=2: applies to models with an inner attention, and "
                                         "timm-xcit has none"),
    (tnt, dict(heads=12, inner_heads=5), "inner_heads=5: does not divide the inner attention width 24; use one "
                                         "of 4, 6, 8, 12, 24"),
    (tnt, dict(heads=12, inner_heads=8), "inner_heads=8: gives inner head dim 3, below the minimum 8"),
])
def test_bad_input_is_one_line_naming_field_value_and_fix(build, plan, expected):
    with pytest.raises(ReshapeError) as e:
        reshape.leaner(make(build), **plan)
    assert len(e.value.problems) == 1
    assert str(e.value.problems[0]).startswith(expected)
    assert "; " in str(e.value.problems[0])


def test_convert_from_an_architecture_name_is_refused_and_writes_nothing(tmp_path):
    with pytest.raises(ReshapeError, match="model=xcit_nano_12_p16_224: is a timm architecture name, which has "
                                           "no weights"):
        reshape.convert("xcit_nano_12_p16_224", tmp_path / "out", heads=8, depth=6)
    assert list(tmp_path.iterdir()) == []


def test_cli_inspect_reproduces_davit_large_and_refuses_a_wrong_stage_count():
    done = run_cli("inspect", "davit_large", "--depth", "1,1,5,1", "--json")
    assert_ok(done)
    report = json.loads(done.stdout)
    assert (report["source"]["params"]["total"], report["result"]["params"]["total"]) == (196_811_752, 139_985_896)
    assert report["result"]["shape"]["layers"] == [1, 1, 5, 1]
    assert_refused(run_cli("inspect", "davit_tiny", "--depth", "1,3,1"),
                   ("depth", "1,3,1", ["has 3 values", "has 4 stages", "--depth 1,1,2,1"]))
