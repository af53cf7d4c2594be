"""Every preset file loads, records its source architecture correctly, and recommends a legal plan."""

from pathlib import Path

import pytest
import yaml

import reshape
from reshape.pipeline import plan_for
from reshape.presets import Preset, load_presets
from reshape.source import spec_of

PRESET_FILES = sorted((Path(__file__).parent.parent / "presets").glob("*.yaml"))

# Parameter counts of the Hub checkpoints each preset names (their published sizes: BERT-base 110M,
# BERT-large 335M, RoBERTa-base 125M, GPT-2 124M, ViT-B/16 86.6M, TinyLlama 1.1B, Qwen2.5 0.49B,
# all-MiniLM-L6-v2 22.7M, SmolLM2 134.5M), so a wrong field in a preset's `config` shows here.
PUBLISHED = {
    "bert-base": 109_514_298,
    "bert-large": 335_174_458,
    "roberta-base": 124_697_433,
    "gpt2": 124_439_808,
    "vit-base": 86_567_656,
    "vit-base-timm": 86_567_656,
    "deit-base": 86_567_656,
    "tinyllama": 1_100_048_384,
    "qwen2.5-0.5b": 494_032_768,
    "minilm": 22_713_216,
    "smollm2": 134_515_008,
}


@pytest.mark.parametrize("file", PRESET_FILES, ids=lambda f: f.stem)
def test_preset_file_is_valid(file):
    preset = Preset(**yaml.safe_load(file.read_text()))  # unknown or missing fields raise here
    assert preset.alias == file.stem and load_presets()[preset.alias] == preset
    assert len(preset.hub_id.split("/")) == 2 and preset.source.strip()
    spec = spec_of(preset.source_config())
    assert spec.family.name == preset.family
    plan = plan_for(spec, None, None, preset)
    assert (plan.heads, plan.depth, plan.mlp) == (preset.heads, preset.depth, preset.mlp)
    assert (plan.head_mode == "keep-head-dim") == preset.keep_head_dim


@pytest.mark.parametrize("alias", sorted(PUBLISHED))
def test_inspect_counts_the_presets_architecture_offline(alias):
    preset = load_presets()[alias]
    report = reshape.inspect(alias, preset.heads, preset.depth, mlp=preset.mlp, keep_head_dim=preset.keep_head_dim)
    assert report["source"]["params"]["total"] == PUBLISHED[alias]
    assert report["result"]["shape"]["layers"] == preset.depth and report["result"]["shape"]["heads"] == preset.heads
    assert report["result"]["params"]["total"] < PUBLISHED[alias]

