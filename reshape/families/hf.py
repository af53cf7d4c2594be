"""Hugging Face transformers families: BERT, RoBERTa, ViT, GPT-2, LLaMA-style decoders.

Each family is data: its config keys, where its block stack lives, and its weight map. Rebuilding
goes through the family's own config and class, so the result loads with plain `from_pretrained`.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path


from ..plan import Shape, target_shape
from .base import BlockWeights, Family, ModelSpec, Proj, config_count, head_dim_of, meta_parameters

# Config entries that hold one value per layer and must follow the kept layers.
PER_LAYER_KEYS = ("layer_types",)


@dataclass(frozen=True)
class ConfigKeys:
    heads: str = "num_attention_heads"
    layers: str = "num_hidden_layers"
    hidden: str = "hidden_size"
    mlp: str = "intermediate_size"
    kv_heads: str | None = None
    head_dim: str | None = None


class HFFamily(Family):
    library = "transformers"

    def __init__(self, name, covers, model_types, layers_path, weights, embeddings,
                 keys=ConfigKeys(), can_widen_attention=False, can_split_aware=True):
        self.name = name
        self.covers = covers
        self.model_types = tuple(model_types)
        self.layers_path = layers_path  # attribute path from the base model to the block stack
        self.weights = weights
        self.embeddings = embeddings  # attribute names on the base model holding embeddings
        self.keys = keys
        self.can_widen_attention = can_widen_attention
        self.can_split_aware = can_split_aware

    def claims(self, obj) -> bool:
        config = getattr(obj, "config", obj)
        return getattr(config, "model_type", None) in self.model_types

    def spec(self, model):
        return ModelSpec(self, model.config, type(model))

    def shape(self, config) -> Shape:
        k = self.keys
        heads, hidden = config_count(config, k.heads), config_count(config, k.hidden)
        kv = getattr(config, k.kv_heads, None) if k.kv_heads else None
        head_dim = getattr(config, k.head_dim, None) if k.head_dim else None
        return Shape(
            layers=config_count(config, k.layers),
            heads=heads,
            kv_heads=config_count(config, k.kv_heads) if kv else heads,
            head_dim=config_count(config, k.head_dim) if head_dim else head_dim_of(config, k.hidden, k.heads),
            hidden=hidden,
            mlp=getattr(config, k.mlp) or 4 * hidden,  # GPT-2 stores None for 4 x hidden
        )

    def layers(self, model):
        return functools.reduce(getattr, self.layers_path.split("."), model.base_model)

    def new_config(self, config, shape, plan):
        new = target_shape(shape, plan)
        k = self.keys
        config = copy.deepcopy(config)
        setattr(config, k.heads, new.heads)
        setattr(config, k.layers, new.layers)
        if k.kv_heads:
            setattr(config, k.kv_heads, new.kv_heads)
        if k.head_dim:
            setattr(config, k.head_dim, new.head_dim)
        if plan.mlp:
            setattr(config, k.mlp, new.mlp)
        # The rebuilt model holds plain tensors (a GGUF source is dequantised on load).
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
        for key in PER_LAYER_KEYS:
            values = getattr(config, key, None)
            if isinstance(values, list) and len(values) == shape.layers:
                setattr(config, key, [values[i] for i in plan.keep])
        return config

    def config_problem(self, config):
        # Round-trip through the class's own validation, as from_pretrained would (e.g. LlamaConfig
        # insists that heads divide hidden_size even though head_dim is its own key).
        try:
            type(config).from_dict(config.to_dict())
        except Exception as e:  # the library's validators raise various types
            return str(e).strip().splitlines()[-1]
        return None

    def build(self, spec, empty):
        if not empty:
            return spec.cls(spec.config)
        # Parameters on the meta device, to be assigned; buffers stay real. Skipping the
        # initialisers matters: they run even on meta tensors and cost more than the weight transfer.
        # (Imported here: reshape/config_convert.py uses the families without transformers' import cost.)
        from transformers.initialization import no_init_weights

        with no_init_weights(), meta_parameters():
            model = spec.cls(spec.config)
        model.tie_weights()  # so that parameter counts see tied weights once
        return model

    def embedding_modules(self, model):
        return [model.base_model.get_submodule(name) for name in self.embeddings]

    def save(self, model, spec, out: Path):
        model.save_pretrained(out)

    def decoder_only(self, config) -> bool:
        # A type with a causal-LM head and no masked-LM head (BERT has both) and one stack is a decoder.
        from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                            MODEL_FOR_MASKED_LM_MAPPING_NAMES)

        kind = getattr(config, "model_type", None)
        return (kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
                and not getattr(config, "is_encoder_decoder", False))

    def finalize(self, model):
        model.tie_weights()


def _separate_qkv(prefix: str, q: str, k: str, v: str) -> tuple[Proj, ...]:
    return (Proj(f"{prefix}{q}", ("q",)), Proj(f"{prefix}{k}", ("k",)), Proj(f"{prefix}{v}", ("v",)))


_BERT_WEIGHTS = BlockWeights(
    attn_in=_separate_qkv("attention.self.", "query", "key", "value"),
    attn_out=Proj("attention.output.dense"),
    mlp_in=(Proj("intermediate.dense"),),
    mlp_out=Proj("output.dense"),
)

BERT = HFFamily("bert", "BERT (bert)", ["bert"], "encoder.layer", _BERT_WEIGHTS, ["embeddings"])
ROBERTA = HFFamily("roberta", "RoBERTa (roberta)", ["roberta"], "encoder.layer", _BERT_WEIGHTS, ["embeddings"])

VIT = HFFamily(
    "vit", "ViT (vit)", ["vit"], "layers",
    BlockWeights(
        attn_in=_separate_qkv("attention.", "q_proj", "k_proj", "v_proj"),
        attn_out=Proj("attention.o_proj"),
        mlp_in=(Proj("mlp.fc1"),),
        mlp_out=Proj("mlp.fc2"),
    ),
    ["embeddings"],
)

GPT2 = HFFamily(
    "gpt2", "GPT-2 (gpt2)", ["gpt2"], "h",
    BlockWeights(
        attn_in=(Proj("attn.c_attn", ("q", "k", "v"), conv1d=True),),
        attn_out=Proj("attn.c_proj", conv1d=True),
        mlp_in=(Proj("mlp.c_fc", conv1d=True),),
        mlp_out=Proj("mlp.c_proj", conv1d=True),
    ),
    ["wte", "wpe"],
    keys=ConfigKeys(heads="n_head", layers="n_layer", hidden="n_embd", mlp="n_inner"),
)

LLAMA = HFFamily(
    "llama", "LLaMA-style decoders (llama, qwen2, mistral)", ["llama", "qwen2", "mistral"], "layers",
    BlockWeights(
        attn_in=_separate_qkv("self_attn.", "q_proj", "k_proj", "v_proj"),
        attn_out=Proj("self_attn.o_proj"),
        mlp_in=(Proj("mlp.gate_proj"), Proj("mlp.up_proj")),
        mlp_out=Proj("mlp.down_proj"),
    ),
    ["embed_tokens"],
    keys=ConfigKeys(kv_heads="num_key_value_heads", head_dim="head_dim"),
    can_widen_attention=True,  # head_dim is its own config key
    can_split_aware=False,  # rotary frequencies are tied to each key dimension: see reshape/headsplit.py
)

FAMILIES = [BERT, ROBERTA, VIT, GPT2, LLAMA]

