"""Tiny random models of any transformers model type, built in code and offline.

Shared by the conformance suite (tests/families/test_conformance.py) and the coverage table
(scripts/coverage.py), so both judge the same models. Like transformers' own testing utilities,
this module is for tests and tools, not for conversions.
"""

from __future__ import annotations

import torch

# Sizes every tiny model shares: 4 heads of dim 16 (so doubling keeps head dim >= 8), 6 layers (so
# two thirds is a real cut), 2 KV heads where the type has grouped-query attention.
TINY = dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=96, vocab_size=128,
            max_position_embeddings=64, head_dim=16, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
# Encoder-decoders name each stack's numbers: sized like TINY where the config has the key.
TINY_STACKS = dict(encoder_layers=6, decoder_layers=6, encoder_attention_heads=4, decoder_attention_heads=4,
                   encoder_ffn_dim=96, decoder_ffn_dim=96, d_model=64, num_decoder_layers=6, d_ff=96, d_kv=16)
# Mixture-of-experts sizes under their common names: a few small experts (the defaults build models
# of 100-400M parameters, which take minutes to check).
TINY_MOE = dict(num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
                moe_k=2, moe_intermediate_size=32, shared_expert_intermediate_size=48, n_group=1, topk_group=1)
# Types whose configs name these numbers differently (or not at all): EXTRA replaces TINY for them.
OWN_NAMES = {"swin", "convnext", "whisper", "t5", "bart", "falcon"}

# Per model type: what its config needs beyond TINY to be small, valid and standard. Keys are the
# config's own names; a type missing here takes TINY as it is.
EXTRA: dict[str, dict] = {
    "distilbert": dict(hidden_dim=96),
    "albert": dict(embedding_size=32),
    "electra": dict(embedding_size=64),
    "deberta-v2": dict(position_buckets=16, max_relative_positions=32, relative_attention=True,
                       pos_att_type=["p2c", "c2p"]),
    "deberta": dict(relative_attention=True, pos_att_type=["p2c", "c2p"]),
    "modernbert": dict(global_attn_every_n_layers=3, local_attention=8),
    "gpt2": dict(n_inner=96),
    "gpt_neo": dict(attention_types=[[["global", "local"], 3]], window_size=8),
    "gptj": dict(n_inner=96, rotary_dim=8),
    "opt": dict(ffn_dim=96, word_embed_proj_dim=64),
    "bloom": dict(n_embed=64),
    "falcon": dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, vocab_size=128, num_kv_heads=2,
                   new_decoder_architecture=True, ffn_hidden_size=96),
    "phi": dict(partial_rotary_factor=0.5),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    "gemma2": dict(sliding_window=8),
    "gemma3_text": dict(sliding_window=8),
    "starcoder2": dict(sliding_window=None),
    "vit": dict(image_size=16, patch_size=4),
    "deit": dict(image_size=16, patch_size=4),
    "beit": dict(image_size=16, patch_size=4, use_relative_position_bias=True),
    "dinov2": dict(image_size=16, patch_size=4, mlp_ratio=2),
    "clip_vision_model": dict(image_size=16, patch_size=4),
    "siglip_vision_model": dict(image_size=16, patch_size=4),
    "swin": dict(image_size=16, patch_size=2, embed_dim=16, depths=[2, 6], num_heads=[2, 4], window_size=2),
    "convnext": dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=16),
    "whisper": dict(encoder_layers=6, decoder_layers=6, encoder_attention_heads=4, decoder_attention_heads=4,
                    d_model=64, encoder_ffn_dim=96, decoder_ffn_dim=96, num_mel_bins=8, max_source_positions=16,
                    max_target_positions=32, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                    decoder_start_token_id=1),
    "t5": dict(d_model=64, d_kv=16, num_heads=4, d_ff=96, num_layers=6, num_decoder_layers=6,
               relative_attention_num_buckets=8, vocab_size=128),
    "bart": dict(encoder_layers=6, decoder_layers=6, encoder_attention_heads=4, decoder_attention_heads=4,
                 d_model=64, encoder_ffn_dim=96, decoder_ffn_dim=96, vocab_size=128, max_position_embeddings=64),
}


def tiny_config(model_type: str, **overrides):
    """A small random config of `model_type`, valid for its own class."""
    from transformers import AutoConfig, CONFIG_MAPPING

    # Only the sizes this config knows: an unknown key would be stored as a stray attribute.
    default = CONFIG_MAPPING[model_type]()
    known = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    base = {} if model_type in OWN_NAMES else {k: v for k, v in {**TINY, **TINY_STACKS, **TINY_MOE}.items() if k in known}
    kwargs = {**base, **EXTRA.get(model_type, {}), **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """The base model of a tiny config, randomly initialised with `seed`, in eval mode."""
    from transformers import AutoModel

    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    _randomise_norms(model)
    return model.eval()


def _randomise_norms(model: torch.nn.Module) -> None:
    # Norm weights start at exactly 1 (or 0 for Gemma's 1+w form) and biases at 0: a transfer that
    # dropped or mixed them up would go unnoticed, so give every 1-D parameter distinct values.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def tiny_inputs(model: torch.nn.Module, batch: int = 2, length: int = 7) -> dict:
    """Fixed inputs the model's forward takes: token ids with padding, pixels, or features."""
    config = model.config
    g = torch.Generator().manual_seed(1)
    name = model.main_input_name
    if name == "pixel_values":
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        return {"pixel_values": torch.randn(batch, config.num_channels, size, size, generator=g)}
    if name == "input_features":
        frames = 2 * config.max_source_positions
        features = torch.randn(batch, config.num_mel_bins, frames, generator=g)
        return {"input_features": features, "decoder_input_ids": torch.randint(0, 100, (batch, 5), generator=g)}
    ids = torch.randint(3, min(config.vocab_size, 100), (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # padding in the second row exercises the attention mask
    inputs = {"input_ids": ids, "attention_mask": mask}
    if config.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids[:, :5].clone()
    return inputs


def fingerprint(model: torch.nn.Module) -> dict[str, str]:
    """Everything a call could change in place in `model`, by name: every parameter and buffer
    (contents, dtype, shape, requires_grad, grad), each module's children, the number of hooks of each
    kind, and every other attribute in a module's __dict__ (caches such as timm's attention_bias_cache,
    configs, the training flag), by repr or, for tensors, by contents. Two fingerprints differ exactly
    where the model was changed: compare them with `changed`."""
    memo: dict[int, str] = {}  # by id: a config shared by every layer is read once
    out = {}
    for name, module in model.named_modules(remove_duplicate=False):
        name = name or "(root)"
        for key, value in vars(module).items():
            if key == "_modules":
                out[f"{name}:children"] = repr([(k, type(v).__name__) for k, v in value.items()])
            elif key in ("_parameters", "_buffers"):
                out.update({f"{name}.{k}": _tensor_digest(v) for k, v in value.items()})
            elif "hook" in key and isinstance(value, dict):  # torch's bookkeeping: only a count can change
                out[f"{name}:{key}"] = f"{len(value)} hooks"
            else:
                out[f"{name}:{key}"] = _digest(value, memo)
    return out


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """The names whose fingerprint entries differ (added, removed or changed)."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def _tensor_digest(t: torch.Tensor | None) -> str:
    if t is None:
        return "None"
    import hashlib

    h = hashlib.sha256(f"{type(t).__name__} {t.dtype} {tuple(t.shape)} {t.requires_grad} {t.device}".encode())
    if t.device.type != "meta":
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    if t.grad is not None:
        h.update(f"grad {_tensor_digest(t.grad)}".encode())
    return h.hexdigest()[:16]


def _digest(value, memo: dict[int, str]) -> str:
    import torch.fx as fx

    if id(value) in memo:
        return memo[id(value)]
    if isinstance(value, fx.Proxy):  # a trace left behind, as LeViT's attention_bias_cache once kept
        out = f"fx.Proxy {value}"
    elif isinstance(value, torch.Tensor):
        out = _tensor_digest(value)
    elif isinstance(value, torch.nn.Module):  # reached through the module tree, not through attributes
        out = f"module {type(value).__name__}"
    elif isinstance(value, dict):
        out = "{" + ", ".join(f"{k!r}: {_digest(v, memo)}" for k, v in value.items()) + "}"
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        out = f"{type(value).__name__}[" + ", ".join(_digest(v, memo) for v in items) + "]"
    else:
        out = repr(value)  # configs print their values; other objects at least their identity
    memo[id(value)] = out
    return out
