"""Model inputs without data: random token ids or noise images of the right shape, for calibration
and measurement."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from . import validate
from .errors import fail

DEFAULT_MAX_LENGTH = 128  # tokens per text example when nobody says (or the model's positions, if fewer)


def max_tokens(model: nn.Module) -> int | None:
    """The longest input a text model takes, or None when it has no position limit (or is not text)."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not positions:
        return None
    # RoBERTa-style position ids start after the padding index (at 2 for RoBERTa, XLM-R, CamemBERT, MPNet).
    # (I-BERT's table is a QuantEmbedding, not an nn.Embedding: read the attribute, not the class.)
    table = next((m for name, m in model.named_modules() if name.endswith("position_embeddings")
                  and isinstance(getattr(m, "padding_idx", None), int)), None)
    if table is not None:
        return positions - table.padding_idx - 1
    return positions


def max_length_for(requested: int | None, *models: nn.Module) -> int:
    """Tokens per text example: `requested`, which must fit every model's positions, or by default
    DEFAULT_MAX_LENGTH capped at them. Checked before the work starts, not met as a size mismatch inside it."""
    validate.check(max_length=requested)
    limit = min(filter(None, (max_tokens(m) for m in models)), default=None)
    if requested is None:
        return min(DEFAULT_MAX_LENGTH, limit or DEFAULT_MAX_LENGTH)
    if limit and requested > limit:
        raise fail("max_length", requested, f"exceeds the {limit} positions the model takes",
                   f"use --max-length {limit} or less")
    return requested


def random_inputs(model: nn.Module, batches: int = 4, batch_size: int = 16, tokens: int = 64,
                  seed: int = 0) -> list[dict]:
    """Calibration batches without data: uniform random token ids, or standard-normal images."""
    generator = torch.Generator().manual_seed(seed)
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab:
        limit = max_tokens(model)
        tokens = min(tokens, limit) if limit else tokens
        return [{"input_ids": torch.randint(vocab, (batch_size, tokens), generator=generator)} for _ in range(batches)]
    if config is not None:  # a transformers vision model
        size, channels = config.image_size, config.num_channels
        key, size = "pixel_values", (size, size) if isinstance(size, int) else tuple(size)
    else:  # timm: the stem's channels; the patch embedding's image size where it has one (TNT embeds
        # pixels; DaViT and Swin take any size), else the one the model was trained at
        channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
        embed = getattr(model, "patch_embed", None) or getattr(model, "pixel_embed", None)
        size = getattr(embed, "img_size", None) or model.pretrained_cfg["input_size"][1:]
        size, key = tuple(size), "x"
    dtype = next(model.parameters()).dtype
    return [{key: torch.randn(batch_size, channels, *size, generator=generator).to(dtype)} for _ in range(batches)]


def whole_model(model: nn.Module):
    """The in-memory way of running calibration batches: each batch through the whole model, in eval
    mode. A runner is called as `run(batches, on_batch, last)` and calls `on_batch(index, batch)` before
    computing anything of that batch; `last` (the last block the caller needs) is for runners that stop
    early (reshape/blockwise.py runs the blocks of a model never loaded whole, one at a time)."""

    def run(batches, on_batch, last: int) -> None:
        with evaluating(model):
            for index, batch in enumerate(batches):
                on_batch(index, batch)
                model(**batch)

    return run


@torch.no_grad()
def run_with_input_hooks(model: nn.Module, modules: dict[int, nn.Module], batches, record, run=None) -> None:
    """Run each batch through `model` in eval mode (or through `run`, see `whole_model`); `record(index,
    x, mask)` receives the first positional input of every listed module and the batch's attention
    mask (None without one). The keys of `modules` are block indices."""
    mask: list[torch.Tensor | None] = [None]

    def on_batch(index, batch):
        mask[0] = batch.get("attention_mask")

    handles = [module.register_forward_pre_hook(lambda m, args, i=i: record(i, args[0].detach(), mask[0]))
               for i, module in modules.items()]
    try:
        (run or whole_model(model))(batches, on_batch, max(modules, default=-1))
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def evaluating(model: nn.Module):
    """Eval mode for the block, then every module's own training flag back: calibration runs on the
    caller's model, which must come out as it went in (a model mid-training keeps its dropout)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
