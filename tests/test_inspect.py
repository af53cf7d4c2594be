"""`inspect` from config.json alone (reshape/config_shape.py) gives the meta-model path's report, number for
number, and falls back to that path wherever it cannot be sure; the CLI's inspect of a preset imports
neither torch nor transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import transformers as tf
from helpers.cases import CASES, case_params

import reshape
from reshape import config_shape
from reshape.config_shape import KINDS, config_report
from reshape.families import find_family
from reshape.pipeline import PLAN_OPTIONS, inspect_meta
from reshape.presets import load_presets

HF_CASES = [case for case in CASES if not case.id.startswith("timm")]


def plans(case) -> list[dict]:
    """The plans every case is inspected with: none, keep-width, explicit layers with a narrower MLP,
    fewer heads, the decoder default (importance), a random init, and keep-head-dim where it applies."""
    out = [{}, {"heads": case.heads, "depth": 2}, {"heads": case.heads, "keep": [0, 2], "mlp": 48},
           {"heads": 2, "depth": 3, "select": "first", "allow_fewer_heads": True},
           {"depth": 2, "select": "last", "init": "random", "head_split": "contiguous"},
           {"heads": case.heads, "depth": 3, "select": "importance"}]
    if case.widen_heads:
        out.append({"heads": case.widen_heads, "keep": [1, 3], "keep_head_dim": True})
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """Each transformers case's config.json, as save_pretrained writes it (inspect reads nothing else)."""
    root = tmp_path_factory.mktemp("configs")
    found = {}
    for case in HF_CASES:
        case.build().config.save_pretrained(root / case.id)
        found[case.id] = str(root / case.id)
    return found


@pytest.mark.parametrize("case", case_params(HF_CASES))
def test_config_report_is_the_meta_models_for_every_case(case, folders):
    for plan in plans(case):
        fast = config_report(folders[case.id], **plan)
        assert fast is not None, plan  # every case and plan here is one the config alone answers
        assert fast == inspect_meta(folders[case.id], **plan), plan
        assert reshape.inspect(folders[case.id], **plan) == fast


# Per model type: a small config, and variations of what changes the counts (tied heads, labels, biases,
# widths the config may leave to the class).
SMALL = {
    "bert": ({"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 96,
              "vocab_size": 100, "max_position_embeddings": 32},
             [{}, {"tie_word_embeddings": False, "num_labels": 3, "type_vocab_size": 1}]),
    "roberta": ({"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 96,
                 "vocab_size": 100, "max_position_embeddings": 40, "pad_token_id": 1},
                [{}, {"tie_word_embeddings": False, "num_labels": 3}]),
    "vit": ({"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 96,
             "image_size": 16, "patch_size": 4},
            [{}, {"qkv_bias": False, "image_size": [16, 24], "patch_size": [4, 8], "num_channels": 1,
                  "pooler_output_size": 48, "num_labels": 3}]),
    "gpt2": ({"n_embd": 64, "n_layer": 4, "n_head": 4, "n_positions": 32, "vocab_size": 100},
             [{}, {"n_inner": 80, "tie_word_embeddings": False, "num_labels": 3}]),
    "llama": ({"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 96,
               "vocab_size": 100, "num_key_value_heads": 2},
              [{}, {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True, "num_labels": 3},
               {"head_dim": 32, "num_key_value_heads": 1}]),
    "qwen2": ({"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 96,
               "vocab_size": 100, "num_key_value_heads": 2},
              [{}, {"head_dim": 32, "tie_word_embeddings": True, "num_labels": 3}]),
    "mistral": ({"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 96,
                 "vocab_size": 100, "num_key_value_heads": 2},
                [{}, {"head_dim": 32, "tie_word_embeddings": True, "num_labels": 3}]),
}
NOT_COUNTED = {"GPT2DoubleHeadsModel", "ViTForMaskedImageModeling"}  # their heads are left to the meta model


def model_classes(model_type: str) -> list[str]:
    """The model classes transformers ships for a model type (its modeling module's public classes)."""
    config = tf.AutoConfig.for_model(model_type)
    module = sys.modules[tf.MODEL_MAPPING[type(config)].__module__]
    return sorted(name for name in module.__all__ if isinstance(getattr(module, name), type)
                  and issubclass(getattr(module, name), tf.PreTrainedModel) and not name.endswith("PreTrainedModel"))


@pytest.mark.parametrize("model_type", sorted(KINDS))
def test_every_class_of_the_counted_types_is_counted_exactly(model_type, tmp_path):
    base, variations = SMALL[model_type]
    counted = []
    for cls in model_classes(model_type):
        for i, variation in enumerate(variations):
            folder = tmp_path / f"{cls}-{i}"
            tf.AutoConfig.for_model(model_type, **{**base, **variation}, architectures=[cls]).save_pretrained(folder)
            plan = {"heads": 8, "depth": 2, "mlp": 48}
            if KINDS[model_type].can_widen_attention and i == 1:
                plan = {"heads": 8, "keep": [0, 3], "keep_head_dim": True}
            fast = config_report(str(folder), **plan)
            if cls in NOT_COUNTED:
                assert fast is None, cls
                continue
            assert fast == inspect_meta(str(folder), **plan), (cls, variation)
            counted.append(cls)
    assert counted, model_type


@pytest.mark.parametrize("model_type", sorted(KINDS))
def test_the_defaults_and_facts_are_the_config_classes(model_type):
    """What config_shape writes out instead of importing transformers: the class defaults of every value
    it reads, the family, the class built without `architectures`, and the family's facts."""
    kind = KINDS[model_type]
    config = tf.AutoConfig.for_model(model_type)
    config_fields = {name for name in type(config).__dataclass_fields__} | set(config.to_dict())
    for key, default in kind.defaults.items():
        if key in config_fields:  # (Qwen2Config has no head_dim: its modeling code reads one when given)
            assert getattr(config, key) == default or (key in kind.optional and default is None), key
        else:
            assert default is None and key in kind.optional, key
    family = find_family(config)
    assert family.name == kind.family
    assert tf.MODEL_MAPPING[type(config)].__name__ == kind.base_class
    assert family.decoder_only(config) == kind.decoder_only
    assert (family.can_widen_attention, family.can_split_aware) == (kind.can_widen_attention, kind.can_split_aware)
    assert {role: getattr(family.keys, role) for role in kind.keys} == kind.keys
    assert set(kind.aliases) == set(getattr(config, "attribute_map", {}))


def test_the_plan_options_are_the_pipelines():
    assert config_shape.PLAN_OPTIONS == PLAN_OPTIONS


PRESETS = load_presets()
# Presets whose architecture a known family counts from its config: their recorded config (or the offline
# folder's config.json, minilm) is answered without building anything.
FAST_PRESETS = sorted(alias for alias, p in PRESETS.items() if p.family in {k.family for k in KINDS.values()}
                      and not p.gguf_file)


@pytest.mark.parametrize("alias", FAST_PRESETS)
def test_config_report_is_the_meta_models_for_the_presets(alias):
    preset = PRESETS[alias]
    plan = {"heads": preset.heads, "depth": preset.depth, "mlp": preset.mlp, "keep_head_dim": preset.keep_head_dim}
    fast = config_report(alias, **plan)
    assert fast is not None
    assert fast == inspect_meta(alias, **plan)
    assert config_report(alias) == inspect_meta(alias)  # the source alone


@pytest.mark.parametrize("alias", sorted(set(PRESETS) - set(FAST_PRESETS)))
def test_other_presets_fall_back_to_the_meta_model(alias):
    """timm models, the generic adapter's types, T5 and a GGUF file: the meta-model path answers."""
    preset = PRESETS[alias]
    assert config_report(alias, heads=preset.heads, depth=preset.depth) is None


def test_what_config_report_leaves_to_the_meta_model(folders, tmp_path):
    bert, llama = folders["bert-model"], folders["llama-lm"]
    assert config_report(bert, heads=8) is not None
    assert config_report(bert, mlp=48) is None  # no heads, depth or keep: the preset or rule of thumb fills them
    assert config_report(bert, heads=5, depth=2) is None  # a plan problem: the meta-model path raises it
    assert config_report(bert, heads=8, depth=2, calib="x") is None  # not a plan option: the same
    assert config_report(llama, heads=6, keep=[0, 1], keep_head_dim=True) is None  # LlamaConfig decides
    assert config_report("deit_tiny_patch16_224", depth=2) is None  # a timm architecture
    assert config_report("org/not-a-preset", depth=2) is None  # a Hub id
    saved = json.loads((Path(bert) / "config.json").read_text())
    for change in ({"auto_map": {"AutoModel": "x.Y"}}, {"add_cross_attention": True, "is_decoder": True},
                   {"architectures": ["BertForSomethingNew"]}, {"hidden_size": None}, {"num_attention_heads": 0},
                   {"num_attention_heads": 5}, {"tie_word_embeddings": "yes"}):
        folder = tmp_path / "changed"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps({**saved, **change}))
        assert config_report(str(folder), heads=8, depth=2) is None, change
    saved = json.loads((Path(llama) / "config.json").read_text())
    for change in ({"num_attention_heads": 3, "num_key_value_heads": 1},  # LlamaConfig refuses 3 heads in 64
                   {"hidden_size": [64, 64]}, {"head_dim": 0}, {"attention_bias": 1}):
        (folder / "config.json").write_text(json.dumps({**saved, **change}))
        assert config_report(str(folder), heads=8, depth=2) is None, change


def inspect_in_a_process(*args: str) -> str:
    """`reshape inspect ARGS` in a fresh process, its stdout ending with the heavy modules it imported."""
    code = (f"import sys, runpy; sys.argv = ['reshape', 'inspect', *{list(args)!r}]\n"
            "try:\n    runpy.run_module('reshape.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'timm') if m in sys.modules]\n"
            "print('heavy:', heavy)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


@pytest.mark.integration
def test_inspect_of_a_preset_or_folder_imports_neither_torch_nor_transformers(folders):
    out = inspect_in_a_process("bert-base", "--heads", "24", "--depth", "8")
    assert "parameters without embeddings" in out and "109,514,298" in out
    assert "Kept layers: [0, 2, 3, 5, 6, 8, 9, 11]" in out
    assert out.strip().endswith("heavy: []")
    out = inspect_in_a_process(folders["llama-lm"], "--heads", "8", "--depth", "2", "--json")
    report, heavy = out.rsplit("heavy:", 1)
    assert json.loads(report) == inspect_meta(folders["llama-lm"], heads=8, depth=2) and heavy.strip() == "[]"
