"""timm image classifiers behind the calling convention the training loop and scoring use.

transformers models take `pixel_values` (and `labels`) and return `.loss` and `.logits`; a timm model
takes an image tensor and returns logits. The two small classes here bridge that, and save through
timm's own `save_for_hf`, so a fine-tuned timm folder still loads with `timm.create_model("local-dir:…")`.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput


class TimmClassifier(nn.Module):
    def __init__(self, model: nn.Module, label_names: list[str] | None):
        super().__init__()
        self.model = model
        self.label_names = label_names
        self.config = SimpleNamespace(num_labels=model.num_classes)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        logits = self.model(pixel_values)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, out, state_dict: dict | None = None) -> None:
        """`state_dict`: this wrapper's weights gathered from FSDP2 shards (loop.full_state_dict), written
        in place of the model's own, which are shards."""
        from timm.models import save_for_hf

        from ..families import find_family

        extra = find_family(self.model).extra_config(self.model)  # e.g. a wide XCiT's attention head dim
        if self.label_names:
            extra["label_names"] = self.label_names
        model = self.model if state_dict is None else _WithWeights(self.model, {
            k.removeprefix("model."): v for k, v in state_dict.items()})
        save_for_hf(model, out, model_config=extra or None, safe_serialization=True)


class _WithWeights:
    """The timm model as save_for_hf reads it (its config attributes), with other weights."""

    def __init__(self, model: nn.Module, weights: dict):
        self._model, self._weights = model, weights

    def state_dict(self) -> dict:
        return self._weights

    def __getattr__(self, name):
        return getattr(self._model, name)


def load_classifier(path, label_names: list[str] | None) -> TimmClassifier:
    """The timm model saved at `path`, with a fresh head of len(label_names) classes when given."""
    from ..source import load_timm_folder

    model = load_timm_folder(path, len(label_names) if label_names else None)
    names = label_names or json.loads((Path(path) / "config.json").read_text()).get("label_names")
    return TimmClassifier(model, names)


class TimmProcessor:
    """timm's evaluation transform for this model, called like a transformers image processor."""

    def __init__(self, path):
        from timm.data import create_transform, resolve_data_config

        config = json.loads((Path(path) / "config.json").read_text())
        self.transform = create_transform(**resolve_data_config(pretrained_cfg=config.get("pretrained_cfg", {})))

    def __call__(self, images, return_tensors: str = "pt") -> dict:
        return {"pixel_values": torch.stack([self.transform(image) for image in images])}

    def save_pretrained(self, out) -> None:
        """Nothing to write: the preprocessing lives in the model's own config.json (pretrained_cfg)."""
