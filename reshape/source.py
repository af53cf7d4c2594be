"""Finding and loading a source model: an alias, a local folder or a Hub id.

Everything is resolved to a local folder first (Hub repos through `snapshot_download`), so one code
path reads configs and weights. Remote code stays off unless asked for; weights load through the
family's own loader (safetensors, or `weights_only` pickles in transformers).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .errors import fail
from .families import ModelSpec, find_family
from .presets import Preset, load_presets, preset_for

# What to fetch from a Hub repo: configs, safetensors weights, tokenizer/processor files,
# and sentence-transformers pooling settings. Never code, never pickles.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "1_Pooling/*"]
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class Source:
    name: str  # what the user asked for
    folder: Path
    spec: ModelSpec
    preset: Preset | None
    trust_remote_code: bool = False
    hub_id: str | None = None  # the Hub repo it comes from, when known


def open_source(name: str, trust_remote_code: bool = False) -> Source:
    """Resolve `name` and read its config (not its weights)."""
    presets = load_presets()
    hub_id = None
    path = Path(name)
    if (path / "config.json").is_file():  # a local model folder wins over an alias of the same name
        folder = path
    elif name in presets:
        preset = presets[name]
        hub_id = preset.hub_id
        folder = preset.local_folder() or _download(preset.hub_id, name)
    elif path.exists():
        raise fail("model", name, "is not a model folder (it has no config.json)",
                   "point to a folder written by save_pretrained or timm's save_for_hf")
    else:
        hub_id = name
        folder = _download(name, name)
    spec = read_spec(folder, trust_remote_code, name)
    preset = preset_for(name, folder)
    return Source(name, folder, spec, preset, trust_remote_code, hub_id or (preset.hub_id if preset else None))


def read_spec(folder: Path, trust_remote_code: bool, name: str) -> ModelSpec:
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise fail("model", name, f"has an unreadable config.json ({e})", "re-download or re-save the model") from None
    if "auto_map" in raw and not trust_remote_code:
        raise fail("model", name, "needs remote code (its config.json has auto_map)",
                   "pass --trust-remote-code if you trust its source")
    if "architecture" in raw and "model_type" not in raw:  # timm's Hub format
        args = dict(raw.get("model_args", {}))
        if "num_classes" in raw:
            args.setdefault("num_classes", raw["num_classes"])
        config = {"architecture": raw["architecture"], "model_args": args,
                  "pretrained_cfg": raw.get("pretrained_cfg")}
        family = find_family(config)
        return ModelSpec(family, config)
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as e:
        raise fail("model", name, f"has a config transformers cannot read ({_first_line(e)})",
                   "check the model type, or upgrade transformers") from None
    family = find_family(config)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    return ModelSpec(family, config, cls or transformers.AutoModel)


def load_model(source: Source) -> nn.Module:
    """Load the source's weights with its family's own loader."""
    folder, spec = source.folder, source.spec
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise fail("model", source.name, f"has no weight file in {folder} (looked for {', '.join(WEIGHT_FILES)})",
                   "re-download the model, or save it with save_pretrained")
    try:
        if spec.family.library == "timm":
            import timm

            model = timm.create_model(f"local-dir:{folder}", pretrained=True)
        else:
            model = spec.cls.from_pretrained(folder, trust_remote_code=source.trust_remote_code)
    except Exception as e:  # any loader failure means the files are unusable as they are
        raise fail("model", source.name, f"weights could not be read ({type(e).__name__}: {_first_line(e)})",
                   "re-download or re-save the model") from None
    return model.eval()


def _download(repo_id: str, name: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, bad id: all mean "not found"
        close = difflib.get_close_matches(name, list(load_presets()), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise fail("model", name, f"is not a local folder, an alias or a reachable Hub repo ({type(e).__name__})",
                   f"{hint}use a local folder, a Hub id, or an alias: {', '.join(load_presets())}") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "no message"
