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
# all-MiniLM-L6-v2 22.7M, SmolLM2 134.5M, T5-small 60.5M, DistilBERT 66M), so a wrong field in a preset's
# `config` shows here. `reshape.inspect` counts the class named by the config's `architectures`.
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
    "t5-small": 60_506_624,  # T5ForConditionalGeneration, LM head tied to the shared embedding
    "distilbert": 66_362_880,  # DistilBertModel (the paper's 66M); the MLM head would add 622,650
}

# Presets whose checkpoints are published only as rounded sizes: (total, {part: size}) checked to within
# ROUNDED_TOLERANCE. Parts are the `embeddings` / `non_embedding` split that `reshape.inspect` reports.
ROUNDED_TOLERANCE = 0.03
PUBLISHED_ROUNDED = {
    # Qwen3 model card: "Number of Parameters: 0.6B; Number of Parameters (Non-Embedding): 0.44B" (tied head).
    "qwen3-0.6b": (0.6e9, {"non_embedding": 0.44e9}),
    # Gemma 3 270M announcement / model card: 270M = 170M embedding + 100M transformer blocks (tied head).
    "gemma-3-270m": (270e6, {"embeddings": 170e6, "non_embedding": 100e6}),
    # SmolLM2 model card: "three sizes: 135M, 360M, and 1.7B parameters" (tied head).
    "smollm2-360m": (360e6, {}),
    # Phi-3 technical report (arXiv 2404.14219): phi-3-mini, "a 3.8 billion parameter language model".
    "phi-3-mini": (3.8e9, {}),
    # DeBERTa-v3-base model card: "86M backbone parameters ... 98M parameters in the Embedding layer" (184M).
    "deberta-v3-base": (184e6, {"embeddings": 98e6, "non_embedding": 86e6}),
    # ModernBERT-base model card: "ModernBERT-base ... 149 million parameters" (ModernBertForMaskedLM).
    "modernbert-base": (149e6, {}),
    # facebook/dinov2-small Hub page: 22.1M params (Dinov2Model; the DINOv2 README rounds ViT-S/14 to 21M).
    "dinov2-small": (22.1e6, {}),
    # OpenCLIP's model-profile table: ViT-B-16 image tower 86.19M, which includes the 768x512 visual
    # projection (393,216); CLIPVisionModel, as the preset names, has no projection: 85.80M.
    "clip-vit-b16-vision": (86.19e6, {}),
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


@pytest.mark.parametrize("alias", sorted(PUBLISHED_ROUNDED))
def test_inspect_counts_match_rounded_published_sizes(alias):
    preset = load_presets()[alias]
    report = reshape.inspect(alias, preset.heads, preset.depth, mlp=preset.mlp, keep_head_dim=preset.keep_head_dim)
    total, parts = PUBLISHED_ROUNDED[alias]
    counted = report["source"]["params"]
    assert counted["total"] == pytest.approx(total, rel=ROUNDED_TOLERANCE)
    for part, size in parts.items():
        assert counted[part] == pytest.approx(size, rel=ROUNDED_TOLERANCE), part
    assert report["result"]["shape"]["layers"] == preset.depth and report["result"]["shape"]["heads"] == preset.heads
    assert report["result"]["params"]["total"] < counted["total"]
