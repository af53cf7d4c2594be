"""Sources only the fx path takes: a factory `package.module:function` (user code: needs
--trust-remote-code), a timm architecture name, or a timm folder whose architecture no adapter claims.

A source is recorded as a small dict in reshape.json, so `load` can build the same module again:
{"factory": "pkg.mod:fn"} or {"timm": "pit_ti_224", "model_args": {...}}.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

from torch import nn

from ..errors import fail

FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def _claimed(config: dict) -> bool:
    from ..families import FAMILIES

    return any(f.claims(config) for f in FAMILIES)


def fx_source(name: str) -> dict | None:
    """The fx recipe of `name`, or None when the adapters' own path handles it."""
    if FACTORY.fullmatch(name):
        return {"factory": name}
    path = Path(name)
    if (path / "config.json").is_file():
        try:
            raw = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None  # the regular path reports the unreadable config
        if "architecture" not in raw or "model_type" in raw:
            return None
        args = dict(raw.get("model_args", {}))
        if "num_classes" in raw:
            args.setdefault("num_classes", raw["num_classes"])
        config = {"architecture": raw["architecture"], "model_args": args}
        return None if _claimed(config) else {"timm": raw["architecture"], "model_args": args, "folder": str(path)}
    from ..presets import load_presets

    if path.exists() or "/" in name or name in load_presets():
        return None
    import timm

    if timm.is_model(name) and not _claimed({"architecture": name, "model_args": {}}):
        return {"timm": name, "model_args": {}}
    return None


def build(source: dict, trust_remote_code: bool = False) -> nn.Module:
    """The source module in eval mode: the factory's result, or timm's model (random init for a name,
    the folder's model.safetensors for a folder)."""
    if "factory" in source:
        name = source["factory"]
        if not trust_remote_code:
            raise fail("model", name, "is a factory: building it imports and runs that code",
                       "pass --trust-remote-code (trust_remote_code=True) if you trust it")
        module_name, _, fn_name = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise fail("model", name, f"cannot be imported ({e})",
                       "check the module path and that its package is importable") from None
        model = fn(**source.get("kwargs", {}))
        if not isinstance(model, nn.Module):
            raise fail("model", name, f"returned a {type(model).__name__}, not an nn.Module",
                       "point to a function that returns the model")
        return model.eval()
    import timm

    model = timm.create_model(source["timm"], pretrained=False, **source.get("model_args", {}))
    if "folder" in source:
        from safetensors.torch import load_file

        from ..confine import safetensors_weights

        weights = safetensors_weights(source["folder"], source["folder"], sharded=False)[0]  # inside, no pickles
        model.load_state_dict(load_file(weights), strict=True)
    return model.eval()


def recorded(source: dict) -> dict:
    """What reshape.json keeps: how to build the module again (a folder's weights come from OUT)."""
    return {k: v for k, v in source.items() if k != "folder"}
