"""The fx path's output folder and its reload.

OUT holds model.safetensors (the rewritten module's state dict), code.py (the generated code of the
top-level graph and of every rewritten block, to read, never executed) and reshape.json (how to build
the source module, the plan, shapes, parameter counts). `load` builds the source module again — with
its own initialisation, so buffers outside the state dict are right — replays the deterministic
rewrite, and loads the safetensors strictly. Nothing is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch.fx as fx
from safetensors.torch import load_model, save_model
from torch import nn

from ..confine import inside, safetensors_weights
from ..version import __version__
from ..errors import Problem, ReshapeError, fail
from ..output import locked, output_problems, space_problems, staged, weight_bytes
from ..plan import Plan, target_shape
from .rewrite import apply_plan, params, plan_fx
from .source import build, recorded


def code_of(gm: fx.GraphModule) -> str:
    parts = [f"# {type(gm).__name__}: the top-level graph\n{gm.code}"]
    for name, module in gm.named_modules():
        if name and isinstance(module, fx.GraphModule):
            parts.append(f"# {name}: a rewritten block\n{module.code}")
    return "\n".join(parts)


def recipe_of(source: dict, plan: Plan, shape, leaf_modules, model: nn.Module, new: fx.GraphModule) -> dict:
    if not all(isinstance(x, str) for x in leaf_modules):
        raise fail("leaf_modules", leaf_modules, "holds classes, which reshape.json cannot record",
                   "name the leaf modules by their qualified names, e.g. ['blocks.0.attn']")
    before, after = params(model), params(new)
    if plan.heads:  # the fx path's hidden is the attention width, which keep-head-dim grows
        new_shape = target_shape(shape, plan)
        new_shape = replace(new_shape, hidden=new_shape.attn_width)
    else:
        new_shape = replace(shape, layers=plan.depth)
    return {
        "reshape_version": __version__,
        "path": "fx",
        "source": source.get("factory") or source.get("timm"),
        "build": recorded(source),
        "leaf_modules": list(leaf_modules),
        "class": type(model).__name__,
        "plan": plan.to_dict(),
        "stack": new.meta["reshape"]["stack"],
        "source_shape": shape.to_dict(),
        "shape": new_shape.to_dict(),
        "params": {"source": before, "result": after,
                   "saved_fraction": round(1 - after["total"] / before["total"], 6)},
    }


def save(new: fx.GraphModule, recipe: dict, out: Path, overwrite: bool = False) -> None:
    """Write OUT; under OUT's lock (`locked`), which the caller took before checking OUT."""
    if problems := space_problems(out, weight_bytes(new)):
        raise ReshapeError(problems)
    with staged(Path(out), overwrite) as tmp:
        save_model(new, str(tmp / "model.safetensors"))  # shared (tied) tensors are stored once
        (tmp / "code.py").write_text(code_of(new))
        (tmp / "reshape.json").write_text(json.dumps(recipe, indent=2) + "\n")


def convert(source: dict, out: str | Path, heads: int | None = None, depth: int | None = None, *,
            overwrite: bool = False, trust_remote_code: bool = False, leaf_modules=(), **options) -> dict:
    """Build the source, rewrite it, write OUT; return the recipe. Nothing is written on bad input."""
    out = Path(out)
    with locked(out):  # from the first check to the final rename: a second writer is refused
        writing = output_problems(out, overwrite, Path(source["folder"]) if "folder" in source else None)
        if options.get("select") == "importance":
            writing.append(Problem("select", "importance", "needs calibration inputs, which the fx path cannot "
                                   "make for an arbitrary module", "use uniform, first, last or --keep"))
        try:
            model = build(source, trust_remote_code)
            planned = plan_fx(model, heads, depth, leaf_modules, name=source.get("factory") or source["timm"],
                              **options)
        except ReshapeError as e:
            raise ReshapeError(writing + e.problems) from None
        if writing:
            raise ReshapeError(writing)
        new = apply_plan(model, planned.plan, planned.shape.heads, leaf_modules, traced=(planned.gm, planned.stack))
        recipe = recipe_of(source, planned.plan, planned.shape, leaf_modules, model, new)
        save(new, recipe, out, overwrite)
        return recipe


def load(out: str | Path, trust_remote_code: bool = False) -> fx.GraphModule:
    """Rebuild a module that the fx path wrote to OUT, in eval mode."""
    out = Path(out)
    try:
        recipe = json.loads(inside(out, "reshape.json", "out reshape.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise fail("out", out, f"has no readable reshape.json ({type(e).__name__})",
                   "point to a folder written by reshape convert") from None
    if not isinstance(recipe, dict) or recipe.get("path") != "fx":
        raise fail("out", out, "was not written by the fx path (its reshape.json has no \"path\": \"fx\")",
                   "load it with transformers' from_pretrained or timm.create_model")
    source = recipe.get("build")
    if not isinstance(source, dict) or not source.keys() & {"factory", "timm"}:
        raise fail("reshape.json build", source, "does not say how to build the source module",
                   "convert the source again")
    if "folder" in source:  # `recorded` drops it: the weights are OUT's, and a path here could lead anywhere
        raise fail("reshape.json build.folder", source["folder"], "names a folder to read weights from, which "
                   "reshape never records (the weights are OUT/model.safetensors)",
                   "remove build.folder from reshape.json, or convert the source again")
    weights = safetensors_weights(out, out, field="out", sharded=False)[0]  # inside OUT, readable
    model = build(source, trust_remote_code)
    plan = Plan(**{k: (tuple(v) if k == "keep" else v) for k, v in recipe["plan"].items() if k != "depth"})
    new = apply_plan(model, plan, recipe["source_shape"]["heads"], recipe.get("leaf_modules", ()))
    load_model(new, str(weights), strict=True)
    return new.eval()
