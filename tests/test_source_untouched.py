"""The source is never changed: by `leaner` and `inspect` on an in-memory model of every family and of
the fx path, and by `convert`, `inspect`, `distill` and `report` on a folder.

An in-memory model is compared by `reshape.testing.fingerprint`: every parameter and buffer, and every
other attribute in each module's __dict__ (caches such as timm's attention_bias_cache, configs, the
training flag, hook counts). `convert`, `distill` and `report` take folders, so there the folders'
files are compared: names, bytes, modes and modification times.

The families run reshape's defaults (importance scoring and the aware head split run forward passes
with hooks on the source), except the 47 generic transformers types, which take the cheap uniform,
contiguous plan (their defaults run on a few representatives) to keep this file fast.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import timm
import torch
import transformers as tf
from torch import nn

from helpers import fx_models as M
from helpers.cases import case_params, timm_vit
from helpers.conformance import COVERED, plan_of

import reshape
from reshape.families import FAMILIES, find_family
from reshape.testing import changed, fingerprint, tiny_model


@pytest.fixture(autouse=True)
def small_calibration(monkeypatch):
    """reshape's own random calibration inputs, fewer and shorter: the hooks run the same way, faster."""
    from reshape import inputs, pipeline

    monkeypatch.setattr(pipeline, "random_inputs", lambda model: inputs.random_inputs(model, 1, 2, 8))


def assert_untouched(model: nn.Module, *calls) -> None:
    before = fingerprint(model)
    for call in calls:
        call(model)
        diff = changed(before, fingerprint(model))
        assert not diff, f"{call.__name__} changed the source: {diff[:10]}"


def leaner(**plan):
    def leaner(model):
        reshape.leaner(model, **plan)
    return leaner


def inspect(**plan):
    def inspect(model):
        reshape.inspect(model, **plan)
    return inspect


# --- the declared transformers families and timm's ViT (tests/helpers/cases.py) ----------------------

@pytest.mark.parametrize("case", case_params())
def test_declared_families(case):
    calls = [leaner(heads=case.heads, depth=2), inspect(heads=case.heads, depth=2)]
    if case.widen_heads:
        calls.append(leaner(heads=case.widen_heads, depth=3, keep_head_dim=True))
    assert_untouched(case.model().train(), *calls)  # train mode: calibration must not leave it in eval


# --- every covered transformers type, through the generic adapter (tests/families/test_conformance.py) 

DEFAULTS = ("deberta-v2", "modernbert", "qwen2_moe", "beit", "t5", "gpt_oss")  # also with reshape's defaults


@pytest.mark.parametrize("model_type", list(COVERED))
def test_generic_types(model_type):
    model = tiny_model(model_type).train()
    plan = plan_of(model_type, model)
    calls = [leaner(**plan, select="uniform", head_split="contiguous"), inspect(**plan)]
    if model_type in DEFAULTS:
        calls.append(leaner(**plan))
    assert_untouched(model, *calls)


# --- timm families with their own adapters ------------------------------------------------------------

def randomised(model: nn.Module) -> nn.Module:
    """timm starts norms, biases and scales at constants: randomise every weight, as the family tests do."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


TIMM = {  # family: (architecture, small args, plan)
    "timm-eva": ("eva02_tiny_patch14_224", dict(img_size=28, depth=3, embed_dim=96, num_heads=3), dict(heads=6, depth=2)),
    "timm-xcit": ("xcit_nano_12_p16_224", dict(img_size=32, depth=4), dict(heads=8, depth=2)),
    "timm-cait": ("cait_xxs24_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, init_values=0.5),
                  dict(heads=8, depth=2)),
    "timm-convit": ("convit_tiny", dict(img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=4,
                                        local_up_to_layer=2), dict(heads=8, depth=3)),
    "timm-davit": ("davit_tiny", dict(depths=(1, 1, 3, 1), embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8),
                                      window_size=2), dict(heads=[2, 4, 8, 16], depth=[1, 1, 2, 1])),
    "timm-swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, window_size=2, embed_dim=16, depths=(2, 2, 2, 2),
                                                       num_heads=(1, 2, 4, 8)), dict(heads=[2, 4, 8, 16], depth=[1, 1, 2, 1])),
    "timm-swinv2": ("swinv2_tiny_window8_256", dict(img_size=32, window_size=2, embed_dim=32, depths=(2, 2, 4, 2),
                                                    num_heads=(1, 2, 4, 8)), dict(heads=[2, 4, 16, 16], depth=[1, 2, 2, 1])),
    "timm-tnt": ("tnt_s_patch16_224", dict(img_size=32, depth=4, embed_dim=96),
                 dict(heads=12, depth=2, inner_heads=6, force=True, mlp=192)),
    "timm-twins": ("twins_svt_small", dict(img_size=32, embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4),
                                           depths=(2, 2, 4, 2), wss=(2, 2, 2, 2)), dict(heads=[2, 4, 6, 8], depth=[1, 2, 2, 1])),
}


@pytest.mark.parametrize("family", list(TIMM))
def test_timm_families(family):
    arch, args, plan = TIMM[family]
    model = randomised(timm.create_model(arch, pretrained=False, num_classes=5, **args)).train()
    assert find_family(model).name == family
    calls = [leaner(**plan)]
    if family != "timm-swinv2":  # Swin v2 cannot be built on the meta device: inspect refuses it (test_timm_breadth)
        calls.append(inspect(**plan))
    assert_untouched(model, *calls)


# --- the fx path (tests/fx/test_fx.py, tests/helpers/fx_models.py, and timm models no adapter claims) ---

def _filled(model: nn.Module, size: int) -> nn.Module:
    """One eval forward first: LeViT and EfficientFormer cache their attention biases on the module then,
    and tracing must leave those caches as it found them (issue 7)."""
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    return model


FX = {  # id: (build, plan)
    "transformer-encoder": (lambda: M.encoder().train(), dict(heads=4, depth=2)),
    "nanogpt": (M.gpt, dict(heads=4, depth=2)),
    "vit": (M.vit, dict(heads=4, depth=2)),
    "partial-run": (M.partial_seeded, dict(heads=4, depth=2)),  # in eval
    "timm-pit": (lambda: timm.create_model("pit_ti_224", img_size=64), dict(heads=8, depth=4)),
    "timm-relpos": (lambda: timm.create_model("test_vit_relpos", img_size=64, num_classes=0), dict(heads=6, depth=6)),
    "timm-levit": (lambda: _filled(timm.create_model("levit_128s", img_size=64, num_classes=0).eval(), 64),
                   dict(depth=3)),
    "timm-efficientformer": (lambda: _filled(timm.create_model("efficientformer_l1", num_classes=0).eval(), 224),
                             dict(depth=2)),
}


@pytest.mark.parametrize("case", list(FX))
def test_fx_path(case):
    build, plan = FX[case]
    torch.manual_seed(0)
    model = build()  # train mode, but LeViT and EfficientFormer in eval: their caches fill only then
    assert not any(f.claims(model) for f in FAMILIES)  # really the fx path
    assert_untouched(model, leaner(**plan))


# --- folders: convert, inspect, distill and report read their sources, never write them ---------------

def folder_state(folder: Path) -> dict[str, tuple]:
    """Every file and folder under `folder`: its mode, modification time, size and contents' hash."""
    state = {}
    for path in sorted([folder, *folder.rglob("*")]):
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        state[str(path.relative_to(folder))] = (info.st_mode, info.st_mtime_ns, info.st_size, digest)
    return state


WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "film", "was", "very"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny BERT folder with a tokenizer, and a text file to distil on."""
    root = tmp_path_factory.mktemp("untouched")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    torch.manual_seed(0)
    tf.BertForMaskedLM(tf.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16)).save_pretrained(root / "teacher")
    tf.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(root / "teacher")
    (root / "text.txt").write_text("\n".join(f"the film was very {w}" for w in WORDS[:6] * 6) + "\n")
    return root / "teacher"


def test_convert_distill_and_report_leave_their_folders_untouched(teacher, tmp_path):
    from reshape.train.distill import distill
    from reshape.train.loop import TrainConfig

    source = folder_state(teacher)
    reshape.inspect(str(teacher), heads=4, depth=3)
    reshape.convert(str(teacher), tmp_path / "student", heads=4, depth=3)
    assert folder_state(teacher) == source, "convert changed its source folder"
    student = folder_state(tmp_path / "student")
    distill(teacher, tmp_path / "student", tmp_path / "distilled", data=teacher.parent / "text.txt",
            config=TrainConfig(max_steps=1, batch_size=8))
    assert folder_state(teacher) == source, "distill changed its teacher"
    assert folder_state(tmp_path / "student") == student, "distill changed its student"
    reshape.report(teacher, tmp_path / "student", batch_sizes=(1,), seq_len=8, repeats=1, kappa=False)
    assert folder_state(teacher) == source and folder_state(tmp_path / "student") == student, "report changed a model"


@pytest.mark.parametrize("model", ["timm-vit", "timm-pit (fx path)"])
def test_convert_leaves_a_timm_folder_untouched(model, tmp_path):
    from timm.models import save_for_hf

    source = tmp_path / "source"
    torch.manual_seed(0)
    if model == "timm-vit":
        save_for_hf(timm_vit(), source, safe_serialization=True)
        plan = dict(heads=8, depth=2)
    else:
        save_for_hf(timm.create_model("pit_ti_224", img_size=64), source, safe_serialization=True)
        plan = dict(heads=8, depth=4)
    before = folder_state(source)
    if model == "timm-vit":
        reshape.inspect(str(source), **plan)
    reshape.convert(str(source), tmp_path / "out", **plan)
    assert folder_state(source) == before
    assert os.listdir(tmp_path / "out")
