"""The transformers model types the conformance suite covers (tests/families/test_conformance.py), and the
plan each one gets there: doubled heads, two thirds of the depth. Adding an architecture means adding one
line to COVERED. Also read by tests/test_source_untouched.py, which runs every covered type."""

from __future__ import annotations

import torch

from reshape.families import find_family
from reshape.stages import StagedShape

# model type -> head mode for doubling the heads ("keep-width", or "keep-head-dim" where q/k norms
# over the head dim forbid changing it).
COVERED = {
    "bert": "keep-width", "roberta": "keep-width", "xlm-roberta": "keep-width", "camembert": "keep-width",
    "distilbert": "keep-width", "albert": "keep-width", "electra": "keep-width", "deberta": "keep-width", "deberta-v2": "keep-width",
    "modernbert": "keep-width", "mpnet": "keep-width",
    "gpt2": "keep-width", "gpt_neo": "keep-width", "gpt_neox": "keep-width", "gptj": "keep-width",
    "opt": "keep-width", "bloom": "keep-width", "falcon": "keep-width", "phi": "keep-width", "phi3": "keep-width",
    "llama": "keep-width", "mistral": "keep-width", "mixtral": "keep-width", "qwen2": "keep-width",
    "qwen2_moe": "keep-width", "qwen3": "keep-head-dim", "gemma": "keep-width", "gemma2": "keep-width",
    "gemma3_text": "keep-head-dim", "olmo": "keep-width", "olmo2": "keep-width", "stablelm": "keep-width",
    "starcoder2": "keep-width", "cohere": "keep-width", "granite": "keep-width", "smollm3": "keep-width",
    "vit": "keep-width", "deit": "keep-width", "beit": "keep-width", "dinov2": "keep-width",
    "clip_vision_model": "keep-width", "siglip_vision_model": "keep-width",
    "t5": "keep-width", "bart": "keep-width", "whisper": "keep-width",
    "gpt_oss": "keep-width", "longt5": "keep-width",  # beyond the 47: attention sinks; a local-attention encoder
    # beyond the 47, one per rule of the generic adapter: a head_dim added to a config that has none
    # (apertus); an attention output gate (afmoe); a per-head convolution (nystromformer); layer kinds
    # that follow the kept layers (llama4_text, glm4_moe); a hybrid stack (lfm3); more names (ctrl,
    # ibert, openai-gpt)
    "apertus": "keep-head-dim", "afmoe": "keep-head-dim", "nystromformer": "keep-width",
    "llama4_text": "keep-width", "glm4_moe": "keep-width", "lfm3": "keep-head-dim", "ctrl": "keep-width",
    "ibert": "keep-width", "openai-gpt": "keep-width", "led": "keep-width",
}


def stacks(model) -> list[tuple[torch.nn.Module, object]]:
    """(block stack, Shape) of each stack: one, or an encoder-decoder's two."""
    family = find_family(model)
    shape = family.shape(model.config)
    if isinstance(shape, StagedShape):
        base = model.base_model
        return [(base.get_submodule(path), s) for path, s in zip(family.stacks, shape.stages)]
    return [(family.layers(model), shape)]


def per_stack(values: list[int]):
    return values if len(values) > 1 else values[0]


def plan_of(model_type: str, model) -> dict:
    shapes = [s for _, s in stacks(model)]
    return dict(heads=per_stack([2 * s.heads for s in shapes]), depth=per_stack([-(-2 * s.layers // 3) for s in shapes]),
                keep_head_dim=COVERED[model_type] == "keep-head-dim")
