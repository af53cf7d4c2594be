"""What the timm family tests compare: a model's outputs on fixed images, and its parameter count."""

from __future__ import annotations

import torch

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def run(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IMAGES)


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())
