"""Tiny models of every family, built in code, with fixed inputs.

Each case is deliberately small (width 32-64, 3-4 layers) so the whole suite runs in minutes on 2 CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import transformers as tf


@dataclass
class Case:
    id: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict]
    heads: int  # a legal "more heads" target for the keep-width mode
    widen_heads: int | None = None  # a legal target for --keep-head-dim, where the family supports it

    def model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return self.build().eval()


def text_inputs(vocab=100, batch=2, length=7) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # padding in the second row exercises the attention mask
    return {"input_ids": ids, "attention_mask": mask}


def image_inputs(channels=3, size=16) -> dict:
    g = torch.Generator().manual_seed(2)
    return {"pixel_values": torch.randn(2, channels, size, size, generator=g)}


def bert_config(**kw):
    return tf.BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
                         vocab_size=100, max_position_embeddings=32, **kw)


def roberta_config(**kw):
    return tf.RobertaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
                            vocab_size=100, max_position_embeddings=40, pad_token_id=1, **kw)


def vit_config(**kw):
    return tf.ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
                        image_size=16, patch_size=4, num_channels=3, **kw)


def gpt2_config(**kw):
    return tf.GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=32, vocab_size=100, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0, **kw)


def llama_config(**kw):
    kw.setdefault("num_key_value_heads", 2)
    return tf.LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
                          vocab_size=100, max_position_embeddings=32, pad_token_id=0, **kw)


def qwen2_config(**kw):
    # Sliding window on the last two layers gives a non-trivial per-layer `layer_types`.
    return tf.Qwen2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=96, vocab_size=100, max_position_embeddings=32, use_sliding_window=True,
                          sliding_window=4, max_window_layers=2, pad_token_id=0, **kw)


def mistral_config(**kw):
    kw.setdefault("num_key_value_heads", 2)
    return tf.MistralConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=96, vocab_size=100, max_position_embeddings=32, head_dim=16,
                            pad_token_id=0, **kw)


def timm_vit():
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=64,
                             depth=4, num_heads=4, num_classes=5)


CASES = [
    Case("bert-model", lambda: tf.BertModel(bert_config()), text_inputs, heads=8),
    Case("bert-seqcls", lambda: tf.BertForSequenceClassification(bert_config(num_labels=3)), text_inputs, heads=8),
    Case("bert-mlm", lambda: tf.BertForMaskedLM(bert_config()), text_inputs, heads=8),
    Case("bert-tokcls", lambda: tf.BertForTokenClassification(bert_config(num_labels=5)), text_inputs, heads=8),
    Case("roberta-mlm", lambda: tf.RobertaForMaskedLM(roberta_config()), text_inputs, heads=8),
    Case("roberta-seqcls", lambda: tf.RobertaForSequenceClassification(roberta_config(num_labels=2)), text_inputs,
         heads=8),
    Case("vit-model", lambda: tf.ViTModel(vit_config()), image_inputs, heads=8),
    Case("vit-imgcls", lambda: tf.ViTForImageClassification(vit_config(num_labels=4)), image_inputs, heads=8),
    Case("gpt2-lm", lambda: tf.GPT2LMHeadModel(gpt2_config()), text_inputs, heads=8),
    Case("gpt2-model", lambda: tf.GPT2Model(gpt2_config()), text_inputs, heads=8),
    Case("gpt2-seqcls", lambda: tf.GPT2ForSequenceClassification(gpt2_config(num_labels=2)), text_inputs, heads=8),
    Case("gpt2-tokcls", lambda: tf.GPT2ForTokenClassification(gpt2_config(num_labels=3)), text_inputs, heads=8),
    Case("llama-lm", lambda: tf.LlamaForCausalLM(llama_config()), text_inputs, heads=8, widen_heads=8),
    Case("llama-tied-lm", lambda: tf.LlamaForCausalLM(llama_config(tie_word_embeddings=True)), text_inputs, heads=8,
         widen_heads=8),
    Case("llama-mha-model", lambda: tf.LlamaModel(llama_config(num_key_value_heads=4)), text_inputs, heads=8,
         widen_heads=8),
    Case("mistral-mha-model", lambda: tf.MistralModel(mistral_config(num_key_value_heads=4)), text_inputs, heads=8,
         widen_heads=6),
    Case("llama-seqcls", lambda: tf.LlamaForSequenceClassification(llama_config(num_labels=2)), text_inputs, heads=8,
         widen_heads=8),
    Case("qwen2-lm", lambda: tf.Qwen2ForCausalLM(qwen2_config()), text_inputs, heads=8, widen_heads=8),
    Case("mistral-lm", lambda: tf.MistralForCausalLM(mistral_config()), text_inputs, heads=8, widen_heads=8),
    Case("timm-vit", timm_vit, image_inputs, heads=8),
]


def by_id(case_id: str) -> Case:
    return next(c for c in CASES if c.id == case_id)


def case_params(cases=CASES):
    return [pytest.param(c, id=c.id) for c in cases]


def first_output(model, inputs) -> torch.Tensor:
    """The main output tensor: logits or last hidden state (transformers), or the timm forward result."""
    with torch.no_grad():
        if "pixel_values" in inputs and not hasattr(model, "config"):
            return model(inputs["pixel_values"])
        return model(**inputs)[0]
