"""The family registry: the first adapter that claims a model handles it.

A module no adapter claims goes to the generic torch.fx path (reshape/fx/), the fallback in
`reshape.leaner` and `reshape.convert`.
"""

from __future__ import annotations

from typing import Any

from ..errors import fail
from .base import BlockWeights, Family, ModelSpec, Proj
from .hf import FAMILIES as _HF_FAMILIES
from .hf_generic import GENERIC
from .timm_vit import TIMM_VIT
from .timm_eva import TIMM_EVA
from .timm_cait import TIMM_CAIT
from .timm_convit import TIMM_CONVIT
from .timm_davit import TIMM_DAVIT
from .timm_swin import TIMM_SWIN
from .timm_swinv2 import TIMM_SWINV2
from .timm_tnt import TIMM_TNT
from .timm_twins import TIMM_TWINS
from .timm_xcit import TIMM_XCIT

# The declared adapters first (hand-written weight maps for the families reshape started with), then the
# generic transformers adapter, which reads any other transformers model from its structure.
FAMILIES: list[Family] = [*_HF_FAMILIES, TIMM_VIT, TIMM_EVA, TIMM_XCIT, TIMM_CAIT, TIMM_CONVIT, TIMM_DAVIT, TIMM_SWIN,
                           TIMM_SWINV2, TIMM_TNT, TIMM_TWINS, GENERIC]


def register(family: Family) -> None:
    FAMILIES.append(family)


def find_family(obj: Any) -> Family:
    """The adapter for a transformers config, a timm config dict, or an nn.Module."""
    for family in FAMILIES:
        if family.claims(obj):
            return family.resolve(obj)
    config = getattr(obj, "config", obj)
    if hasattr(config, "model_type") and hasattr(config, "to_json_string"):
        GENERIC.resolve(obj)  # raises its one-line reason: what was looked for and not found
    raise fail("model", model_kind(obj), "is not a supported model family",
               "use one of: " + "; ".join(f.covers for f in FAMILIES))


def model_kind(obj: Any) -> str:
    """What an unsupported model is, for the refusal: its model_type, timm architecture or class."""
    config = getattr(obj, "config", obj)
    if getattr(config, "model_type", None):
        return f"model_type {config.model_type!r}"
    if isinstance(obj, dict) and "architecture" in obj:
        return f"timm architecture {obj['architecture']!r}"
    return type(obj).__name__


__all__ = ["FAMILIES", "BlockWeights", "Family", "ModelSpec", "Proj", "find_family", "model_kind", "register"]
