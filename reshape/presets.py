"""Presets: one YAML file per architecture in presets/ — alias, Hub id, recommended heads and depth."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Preset:
    alias: str
    hub_id: str
    family: str
    heads: int
    depth: int
    source: str  # where the recommendation comes from
    # The source architecture, enough to build its config offline (transformers: model_type and the
    # config fields that differ from that type's defaults; timm: the architecture name), so every
    # preset is checked against a real config without the Hub.
    config: dict
    mlp: int | None = None  # recommended MLP width (the paper halves it in some rows); None keeps it
    keep_head_dim: bool = False  # the paper's second reading: head dim fixed, attention width grows
    offline_package: str | None = None  # a Python package that ships the weights, used when installed
    offline_path: str = ""
    gguf_file: str | None = None  # the offline copy is this GGUF file instead of a model folder

    def source_config(self):
        """The source's config built offline from `config`: a transformers config or a timm config dict."""
        if self.family.startswith("timm"):
            return {"architecture": self.config["architecture"], "model_args": {}}
        from transformers import AutoConfig

        fields = dict(self.config)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)

    def local_folder(self) -> Path | None:
        """The folder of the offline package's copy, if that package is installed."""
        if not self.offline_package:
            return None
        spec = importlib.util.find_spec(self.offline_package)  # finds without importing
        if spec is None or not spec.submodule_search_locations:
            return None
        folder = Path(spec.submodule_search_locations[0]) / self.offline_path
        return folder if (folder / (self.gguf_file or "config.json")).is_file() else None


@functools.cache
def load_presets() -> dict[str, Preset]:
    found = {}
    for entry in resources.files("reshape._presets").iterdir():
        if entry.name.endswith(".yaml"):
            preset = Preset(**yaml.safe_load(entry.read_text()))
            found[preset.alias] = preset
    return dict(sorted(found.items()))


def preset_for(name: str, folder: Path | None = None, name_or_path: str = "") -> Preset | None:
    """The preset matching an alias, a Hub id, or the offline folder a model came from."""
    for preset in load_presets().values():
        local = preset.local_folder()
        if name in (preset.alias, preset.hub_id) or name_or_path == preset.hub_id:
            return preset
        if local and ((folder and Path(folder).resolve() == local.resolve())
                      or (name_or_path and Path(name_or_path).resolve() == local.resolve())):
            return preset
    return None
