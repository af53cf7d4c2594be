"""`reshape.convert`: a LLaMA-style decoder folder converted from config.json and the safetensors headers
alone, everything else by reshape.pipeline.convert.

The streaming path (reshape/streaming.py) plans from models built on the meta device, which needs
transformers' modeling code. Importing it (and torchvision and torch._dynamo, which transformers' config
classes pull in) takes longer than converting a 1B-parameter model (docs/results/convert-streaming.md).
For the LLaMA-style models reshape/config_shape.py describes tensor by tensor (llama, qwen2 and mistral
folders of the base model or the causal LM) and a plan that needs no activations (`--select uniform`,
`first` or `last`, or `--keep`; the contiguous or keep-head-dim head split; no `--calib`), the names and
shapes of every tensor, before and after, follow from config.json. Here they are planned from it and
checked against the shard headers, and the tensors are written as the streaming path writes them, with
the same transfer (`StreamPlan`), without importing transformers' modeling code. This is how mergekit
works too: from a description of each architecture, not from the library's model classes.

The folder holds the same tensors, shards, index, reshape.json and card as the streaming path's
(tests/test_config_convert.py). config.json is the source's with the changed values set (the layer,
head, key-value head and head-dim counts, the MLP width with --mlp, the per-layer lists); save_pretrained
would also rewrite the keys it renames (torch_dtype as dtype) and drop those equal to the class defaults,
so the two files load to the same config. generation_config.json is copied when the source has one
(from_pretrained builds it from config.json otherwise, as save_pretrained's copy would hold).
Anything this module does not describe, or any doubt (legacy tensor names, mixed dtypes, remote code,
quantised weights), goes to reshape.pipeline.convert, which also gives every error about the source.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from . import validate
from .card import write_recipe_and_card
from .config_shape import KINDS, Kind, plan_from_config
from .families.hf import PER_LAYER_KEYS
from .errors import ReshapeError
from .output import copy_extra_files, locked, output_problems, space_problems, staged
from .plan import Plan, Shape
from .stages import result_shape
from .presets import preset_for
from .progress import steps
from .streaming import Checkpoint, StreamPlan, load_dtype, shard_files, splits_aware
from .version import __version__


def convert(source: str | Path, out: str | Path, heads: int | None = None, depth: int | None = None, *,
            seed: int = 0, overwrite: bool = False, trust_remote_code: bool = False, progress: bool = False,
            calib: str | None = None, **options) -> dict:
    """Convert a Hub id, local folder or alias into a standard folder at `out`; return its recipe.

    With select="importance" (the default for decoder-only language models), the kept layers are those
    with the highest Block Influence on `calib` (a data recipe, file or Hub dataset of text), or on
    random tokens without it; the aware head split is weighted by `calib` too."""
    validate.check(seed=seed)
    recipe = convert_from_config(source, out, heads, depth, overwrite=overwrite, progress=progress, calib=calib,
                                 **options)
    if recipe is not None:
        return recipe
    from .pipeline import convert as convert_model  # torch, transformers' modeling code: seconds to import

    return convert_model(source, out, heads, depth, seed=seed, overwrite=overwrite,
                         trust_remote_code=trust_remote_code, progress=progress, calib=calib, **options)


def convert_from_config(source, out, heads=None, depth=None, *, overwrite: bool = False, progress: bool = False,
                        calib: str | None = None, **options) -> dict | None:
    """The conversion planned from config.json, or None (nothing written) where it does not apply."""
    if calib is not None or not isinstance(source, (str, os.PathLike)) or not isinstance(out, (str, os.PathLike)):
        return None
    name, folder, out = str(source), Path(source), Path(out)
    raw = _config(folder)
    kind = KINDS.get(raw.get("model_type")) if raw else None
    resolved = kind.resolve(raw) if kind else None
    if resolved is None:
        return None
    shape, tensors = kind.shape(resolved), kind.tensors(resolved, resolved["class"])
    planned = plan_from_config(kind, shape, heads, depth, options) if shape and tensors else None
    if planned is None or planned[1]:
        return None  # not described here, or a problem pipeline.convert reports; or layers by importance
    plan = planned[0]
    if plan.init != "transfer" or splits_aware(plan):
        return None  # a fresh model is initialised in memory; the aware split needs activations
    with locked(out):  # from the first check to the final rename: a second writer is refused
        if problems := output_problems(out, overwrite, folder):
            raise ReshapeError(problems)
        checkpoint = Checkpoint(folder, name)
        dtype = load_dtype(raw.get("dtype") or raw.get("torch_dtype"), checkpoint)
        if dtype is None or checkpoint.shapes != tensors:
            return None  # mixed dtypes; legacy, missing or extra tensors: from_pretrained's rules apply
        conversion = ConfigConversion(kind, raw, resolved, shape, plan, checkpoint, dtype, tensors)
        recipe = _recipe(name, folder, kind, resolved, conversion)
        if problems := space_problems(out, conversion.nbytes):
            raise ReshapeError(problems)
        with steps(progress) as step, \
                step(f"Streaming to {out}: {plan.heads} heads, {plan.depth} layers ({plan.head_split} head split)"), \
                staged(out, overwrite) as tmp:
            conversion.write(tmp)
            recipe["copied_files"] = copy_extra_files(folder, tmp)  # the tokenizer files (pipeline's, for a folder)
            write_recipe_and_card(tmp, recipe, folder, out.name)
    return recipe


class ConfigConversion(StreamPlan):
    """The streamed conversion of a model reshape/config_shape.py describes tensor by tensor."""

    def __init__(self, kind: Kind, raw: dict, resolved: dict, shape: Shape, plan: Plan, checkpoint: Checkpoint,
                 dtype: torch.dtype, tensors: dict[str, tuple[int, ...]]):
        """`tensors`: the source's, name -> shape (Kind.tensors), which the checkpoint holds."""
        self.raw, self.new_config = raw, kind.new_config(resolved, shape, plan)
        self.new_counts = kind.count(self.new_config)
        base = "" if resolved["class"].endswith("Model") else "model."
        super().__init__(_family(raw["model_type"]), shape, checkpoint, _meta(tensors, dtype), f"{base}layers.")
        # LLaMA-style models hold no per-head tensors outside their blocks
        self.set_plan(plan, _meta(kind.tensors(self.new_config, resolved["class"]), dtype), outside={})
        self.changed = {key: self.new_config[key] for role, key in kind.keys.items() if role != "mlp" or plan.mlp}

    def write_config(self, folder: Path) -> tuple[dict[str, list[str]], dict | None, dict[str, str] | None]:
        """config.json: the source's, with the values the plan changes (module docstring), and the source's
        generation_config.json."""
        config = {**self.raw, **self.changed}
        for key in PER_LAYER_KEYS:  # one value per layer: the kept layers' (HFFamily.new_config)
            values = config.get(key)
            if isinstance(values, list) and len(values) == self.shape.layers:
                config[key] = [values[i] for i in self.plan.keep]
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation = self.checkpoint.folder / "generation_config.json"
        if generation.is_file():  # (save_pretrained writes the one from_pretrained loaded from it)
            shutil.copyfile(generation, folder / generation.name)
        files, index = shard_files(self.outputs, self.checkpoint.shard_bytes, self.new_counts["total"])
        return files, index, {"format": "pt"}  # save_pretrained's shard metadata


def _config(folder: Path) -> dict | None:
    """config.json of a local folder of a transformers model with no remote code and plain weights."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None  # no local folder (an alias, Hub id or timm name), or a config pipeline.convert reports
    if not isinstance(raw, dict) or "auto_map" in raw or raw.get("quantization_config") is not None:
        return None
    return raw


def _family(model_type: str):
    from .families import FAMILIES

    return next(f for f in FAMILIES if model_type in getattr(f, "model_types", ()))


def _meta(tensors: dict[str, tuple[int, ...]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape in tensors.items()}


def _recipe(name: str, folder: Path, kind: Kind, resolved: dict, conversion: ConfigConversion) -> dict:
    """reshape.json, as pipeline.make_recipe writes it (its counts from config_shape's formulas)."""
    preset = preset_for(name, folder)
    before, after, plan = kind.count(resolved), conversion.new_counts, conversion.plan
    return {
        "reshape_version": __version__,
        "source": name,
        "hub_id": preset.hub_id if preset else None,
        "family": conversion.family.name,
        "class": resolved["class"],
        "plan": plan.to_dict(),
        "source_shape": conversion.shape.to_dict(),
        "shape": result_shape(conversion.shape, plan).to_dict(),
        "params": {"source": before, "result": after,
                   "saved_fraction": round(1 - after["total"] / before["total"], 6)},
    }
