"""The convert pipeline: plan -> rebuild -> transfer -> save. `leaner` is the in-memory half."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from . import validate
from .blockwise import NotBlockwise
from .card import write_recipe_and_card
from .errors import Problem, ReshapeError, fail
from .families import FAMILIES, ModelSpec, find_family
from .headsplit import attention_input_covariances
from .importance import keep_most_important, layer_scores
from .inputs import random_inputs
from .output import locked, output_problems, space_problems, staged, weight_bytes
from .plan import Plan, legal_heads, parent_heads
from .presets import load_presets, preset_for
from .progress import steps
from .source import Source, calibration_batches, load_model, open_source, save_tokenizer_files, spec_of
from .stages import StagedPlan, any_plan, any_rule_of_thumb, result_shape
from .streaming import Conversion, layer_plan, layers_prefix, splits_aware, streaming_conversion
from .summary import count_params, describe
from .transfer import load_into, transfer_stages, transfer_state
from .version import __version__

log = logging.getLogger("reshape")

PLAN_OPTIONS = ("keep", "select", "keep_head_dim", "mlp", "init", "allow_fewer_heads", "force", "head_split",
                "inner_heads")


def leaner(model: nn.Module, heads: int | None = None, depth: int | None = None, *, seed: int = 0,
           calib: Iterable[dict] | None = None, **options) -> nn.Module:
    """A new model of the same class with `heads` attention heads and `depth` layers; `model` is untouched.

    Options: keep (layer indices), select ("uniform" | "first" | "last" | "importance"; by default
    importance for decoder-only language models, else uniform), keep_head_dim, mlp,
    init ("transfer" | "random"), head_split ("aware" | "contiguous"; aware where it applies by
    default), allow_fewer_heads, force. `calib`, batches of model inputs, scores the layers for
    importance and weights the aware head split by real activations (random inputs without it). With
    neither heads nor depth, the architecture's preset is used if one exists, else the paper's rule of thumb.
    """
    validate.expect("model", model, nn.Module, "a torch nn.Module",
                    "pass the model object; for a Hub id, alias or folder use reshape.convert(name, out)")
    validate.check(seed=seed)
    if not any(f.claims(model) for f in FAMILIES):  # no adapter knows it: rewrite its traced graph
        if _is_transformers(model):  # torch.fx cannot trace transformers v5 models: say why none matched
            find_family(model)
        from .fx import leaner as fx_leaner

        return fx_leaner(model, heads, depth, **options)
    spec = find_family(model).spec(model)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    plan = plan_for(spec, heads, depth, preset_for(name, name_or_path=name), **options)
    if by_importance(spec, options):
        scores = layer_scores(model, spec.family.layers(model), calib or random_inputs(model))
        plan = keep_most_important(spec.family, spec.family.shape(spec.config), plan, scores)
    covs = _input_covariances(model, spec, plan, calib)
    new, _ = rebuild(model, spec, plan, seed=seed, share_weights=False, input_covs=covs)
    return new


def _is_transformers(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "model_type") and hasattr(model, "base_model")


def plan_for(spec: ModelSpec, heads, depth, preset=None, **options) -> Plan:
    """Validate a request for this model; fill heads/depth from the preset or rule of thumb if both are absent."""
    unknown = set(options) - set(PLAN_OPTIONS)
    if unknown:
        raise TypeError(f"unknown plan options: {', '.join(sorted(unknown))} (known: {', '.join(PLAN_OPTIONS)})")
    validate.whole_numbers(heads=heads, depth=depth, keep=options.get("keep"), mlp=options.get("mlp"),
                           inner_heads=options.get("inner_heads"))
    family = spec.family
    shape = family.shape(spec.config)
    if heads is None and depth is None and options.get("keep") is None:
        if preset:
            heads, depth = preset.heads, preset.depth
            options["mlp"] = options.get("mlp") or preset.mlp
            options["keep_head_dim"] = options.get("keep_head_dim") or preset.keep_head_dim
            log.warning("reshape: no heads/depth given; using preset %r: %s heads, %s layers%s%s", preset.alias,
                        heads, depth, f", MLP width {preset.mlp}" if preset.mlp else "",
                        ", head dim kept" if preset.keep_head_dim else "")
        else:
            heads, depth = any_rule_of_thumb(shape)
            log.warning("reshape: no heads/depth given; using the rule of thumb (double the heads where the "
                        "width allows, two thirds of the depth): %s heads, %s layers", heads, depth)
    options["select"] = options.get("select") or default_select(family, spec.config)
    if options["select"] == "importance":  # validated as uniform: the caller's scores pick the layers
        options["select"] = "uniform"
    refused = [Problem(option, options[option], reason, f"leave --{option.replace('_', '-')} out")
               for option, reason in family.refuses.items() if options.get(option)]
    if refused:
        raise ReshapeError(refused)
    inner = family.inner_shape(spec.config)
    plan = any_plan(shape, family=family.name, heads=heads, depth=depth,
                    can_widen_attention=family.can_widen_attention, can_split_aware=family.can_split_aware,
                    **({"inner": inner} if inner else {}), **options)
    if options.get("keep") is None and options["select"] == "uniform":
        plan = family.align_plan(shape, plan)
    problem = family.plan_problem(shape, plan)
    if problem:
        raise ReshapeError([problem])
    problem = family.config_problem(family.new_config(spec.config, shape, plan))
    if problem:
        legal = [h for h in legal_heads(shape, plan.head_mode == "keep-head-dim")
                 if h >= shape.heads and not family.config_problem(
                     family.new_config(spec.config, shape, replace(plan, heads=h)))]
        raise fail("heads", plan.heads, f"gives a config that {family.library} refuses ({problem})",
                   f"use one of {', '.join(map(str, legal))}")
    return plan


def default_select(family, config) -> str:
    """How layers are picked when nobody said: evenly spread for encoders and vision models (DistilBERT's
    rule); by Block Influence for decoder-only language models, on the calibration data or else random
    tokens (spreading the cut evenly wrecks a decoder: docs/results/decoder-default.md)."""
    return "importance" if family.decoder_only(config) else "uniform"


def by_importance(spec: ModelSpec, options: dict) -> bool:
    """Whether the layers to keep are picked by their Block Influence (asked for, or the default)."""
    if options.get("keep") is not None:
        return False
    return (options.get("select") or default_select(spec.family, spec.config)) == "importance"


def rebuild(model: nn.Module, spec: ModelSpec, plan: Plan, *, seed: int = 0, share_weights: bool = False,
            input_covs: dict[int, torch.Tensor] | None = None) -> tuple[nn.Module, ModelSpec]:
    """Build the planned model and fill it. With `share_weights`, untouched tensors are shared with
    `model` instead of copied (for callers that discard the source, such as `convert`). `input_covs`
    weights the aware head split (see `_input_covariances`)."""
    family = spec.family
    shape = family.shape(spec.config)
    new_spec = ModelSpec(family, family.new_config(spec.config, shape, plan), spec.cls)
    dtype = next(model.parameters()).dtype
    if plan.init == "random":
        torch.manual_seed(seed)
        new = family.build(new_spec, empty=False).to(dtype)
    else:
        new = family.build(new_spec, empty=True)
        if isinstance(plan, StagedPlan):
            state = transfer_stages(model.state_dict(), family.stage_prefixes(model), family.weights, shape, plan,
                                    family.adjust_block)
        else:
            state = transfer_state(model.state_dict(), layers_prefix(model, family), family.weights, shape,
                                   layer_plan(family, plan), input_covs, family.adjust_block)
            if plan.heads != shape.heads:
                parents = torch.tensor(parent_heads(shape, plan))
                for key, axis in family.outside_per_head(model).items():
                    state[key] = state[key].index_select(axis, parents)
        if not share_weights:
            state = {k: v.clone() for k, v in state.items()}
        load_into(new, state)
        family.finalize(new)
    return new.train(model.training), new_spec


def convert(source: str | Path, out: str | Path, heads: int | None = None, depth: int | None = None, *,
            seed: int = 0, overwrite: bool = False, trust_remote_code: bool = False, progress: bool = False,
            calib: str | None = None, **options) -> dict:
    """`reshape.convert` (reshape/config_convert.py) for every source it does not convert from config.json
    alone: this path reads the config with transformers and plans on the model (streamed, or in memory)."""
    validate.expect("source", source, (str, os.PathLike), "a Hub id, alias, folder or timm architecture name",
                    "pass the model's name or folder as a string; for a model object use reshape.leaner(model)")
    validate.expect("out", out, (str, os.PathLike), "a folder path", "pass the output folder as a string or Path")
    validate.check(seed=seed)
    source, out = str(source), Path(out)
    from .fx import convert as fx_convert, fx_source

    if (fx := fx_source(source)) is not None:  # a factory, or a timm model no adapter claims
        return fx_convert(fx, out, heads, depth, overwrite=overwrite, trust_remote_code=trust_remote_code,
                          **options)
    with locked(out):  # from the first check to the final rename: a second writer is refused
        writing = output_problems(out, overwrite)
        try:  # report output and model problems together
            src = open_source(source, trust_remote_code)
            writing = output_problems(out, overwrite, src.folder)
            plan = plan_for(src.spec, heads, depth, src.preset, **options)
        except ReshapeError as e:
            raise ReshapeError(writing + e.problems) from None
        if writing:
            raise ReshapeError(writing)
        importance = by_importance(src.spec, options)
        # Streaming: no model in memory, the same folder (reshape/streaming.py says when it applies).
        if conversion := streaming_conversion(src, plan, importance=importance, calib=calib):
            recipe = _convert_streaming(src, conversion, out, overwrite, progress, calib)
            if recipe is not None:
                return recipe
        family = src.spec.family
        with steps(progress) as step:
            with step(f"Loading {source}"):
                model = load_model(src)
            scores = None
            batches = calibration_batches(src, calib, model) if calib else None
            if importance:
                with step(f"Scoring layers on {calib or 'random tokens'}"):
                    scores = layer_scores(model, family.layers(model), batches or random_inputs(model))
                    plan = keep_most_important(family, family.shape(src.spec.config), plan, scores)
            with step(f"Rebuilding: {plan.heads} heads, {plan.depth} layers ({plan.head_split} head split)"):
                covs = _input_covariances(model, src.spec, plan, batches)
                new, new_spec = rebuild(model, src.spec, plan, seed=seed, share_weights=True, input_covs=covs)
                recipe = make_recipe(src, plan, model, new)
                if scores:
                    recipe["layer_scores"] = {"metric": "block-influence", "calib": calib or "random tokens",
                                              "scores": scores}
                if covs:
                    recipe["head_split_calib"] = calib or "random inputs"
                del model
            _warn_if_timm_cannot_load(family, new_spec.config, new, out)
            if problems := space_problems(out, weight_bytes(new)):
                raise ReshapeError(problems)
            with step(f"Saving to {out}"), staged(out, overwrite) as tmp:
                family.save(new, new_spec, tmp)
                _write_recipe_and_card(src, recipe, tmp, out)
        return recipe


def _convert_streaming(src: Source, conversion: Conversion, out: Path, overwrite: bool, progress: bool,
                       calib: str | None) -> dict | None:
    """`convert` without the model in memory: the activations the plan needs computed one block at a
    time (reshape/blockwise.py), then tensors read one block at a time and written to output shards as
    they fill (reshape/streaming.py); the folder is the in-memory path's. None when the model's forward
    turns out not to run block by block (nothing written yet): `convert` then loads it in memory."""
    scores = None
    with steps(progress) as step:
        # As the in-memory path reads them: --calib is tokenised (and checked) even where nothing uses it.
        batches = calibration_batches(src, calib, conversion.source) if calib else None
        try:
            if conversion.importance:
                with step(f"Scoring layers on {calib or 'random tokens'}, one block at a time"):
                    scores = conversion.score_layers(batches)
            if splits_aware(conversion.plan):
                with step(f"Fitting the aware head split on {calib or 'random inputs'}, one block at a time"):
                    conversion.fit_head_split(batches)
        except NotBlockwise as e:
            log.warning("reshape: %s: its activations cannot be computed one block at a time (%s); loading the "
                        "whole model instead", src.name, e)
            return None
        plan = conversion.plan
        recipe = make_recipe(src, plan, conversion.source, conversion.new)
        if scores:
            recipe["layer_scores"] = {"metric": "block-influence", "calib": calib or "random tokens", "scores": scores}
        if conversion.covs:
            recipe["head_split_calib"] = calib or "random inputs"
        family = src.spec.family
        _warn_if_timm_cannot_load(family, family.new_config(src.spec.config, family.shape(src.spec.config), plan),
                                  conversion.new, out)
        if problems := space_problems(out, conversion.nbytes):
            raise ReshapeError(problems)
        with step(f"Streaming to {out}: {plan.heads} heads, {plan.depth} layers ({plan.head_split} head split)"), \
                staged(out, overwrite) as tmp:
            conversion.write(tmp)
            _write_recipe_and_card(src, recipe, tmp, out)
    return recipe


def _warn_if_timm_cannot_load(family, new_config, new: nn.Module, out: Path) -> None:
    """A timm folder that only reshape.load rebuilds (XCiT's wide attention) is written with a warning."""
    if family.library == "timm" and not family.timm_loads(new_config):
        log.warning("reshape: %s will need reshape.load (or reshape finetune/eval/report) to load: timm alone "
                    "cannot build its attention (%s)", out, ", ".join(f"{k}={v}" for k, v in
                                                                    family.extra_config(new).items()))


def _write_recipe_and_card(src: Source, recipe: dict, tmp: Path, out: Path) -> None:
    """What every converted folder gets besides the model: the tokenizer files, reshape.json, the card."""
    recipe["copied_files"] = save_tokenizer_files(src, tmp)
    write_recipe_and_card(tmp, recipe, src.folder, out.name)


def inspect_meta(source: str | nn.Module, heads: int | None = None, depth: int | None = None, *,
                 trust_remote_code: bool = False, **options) -> dict:
    """`reshape.inspect` by building the model on the meta device and counting its parameters: for a
    model object, and for whatever reshape/config_shape.py cannot count from the config alone.
    Reads configs only: no weights are loaded for a name or folder."""
    validate.expect("source", source, (str, os.PathLike, nn.Module), "a Hub id, alias, folder or model",
                    "pass the model's name or folder as a string, or the model object")
    if isinstance(source, nn.Module):
        spec, preset = find_family(source).spec(source), None
    else:
        source = str(source)
        preset = load_presets().get(source)
        if preset and not preset.local_folder() and not (Path(source) / "config.json").is_file():
            spec = spec_of(preset.source_config())  # the preset records its architecture: no download
        else:
            src = open_source(source, trust_remote_code)
            spec, preset = src.spec, src.preset
    family = spec.family
    shape = family.shape(spec.config)  # first: it refuses a broken config before anything is built from it
    # Parameters on the meta device: counting them reads no weights and allocates nothing.
    model = source if isinstance(source, nn.Module) else family.build(spec, empty=True)
    report = {"family": family.name, "source": describe(shape, count_params(model, family))}
    asked = [heads, depth, options.get("keep"), options.get("mlp"), options.get("keep_head_dim") or None,
             options.get("inner_heads")]
    if all(x is None for x in asked):
        return report
    plan = plan_for(spec, heads, depth, preset, **options)
    new_spec = ModelSpec(family, family.new_config(spec.config, shape, plan), spec.cls)
    new_model = family.build(new_spec, empty=True)
    report["plan"] = plan.to_dict()
    if by_importance(spec, options):  # convert picks them from the scores; the counts do not depend on which
        report["plan"]["keep"] = "by importance"
    report["result"] = describe(result_shape(shape, plan), count_params(new_model, family))
    return report


def load(folder: str | Path, trust_remote_code: bool = False) -> nn.Module:
    """A model folder that reshape wrote, in eval mode. A torch.fx folder (no config.json) is rebuilt by
    replaying its rewrite; any other loads through its family's loader, which an XCiT converted with
    --keep-head-dim needs (the rest also load with plain transformers or timm)."""
    validate.expect("folder", folder, (str, os.PathLike), "a folder path",
                    "pass the folder that reshape.convert (or distill, finetune) wrote, as a string or Path")
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        from .fx import load as fx_load

        return fx_load(folder, trust_remote_code)
    return load_model(open_source(str(folder), trust_remote_code)).eval()


def make_recipe(src: Source, plan: Plan, model: nn.Module, new: nn.Module) -> dict:
    """reshape.json: everything needed to know how the folder was made."""
    family = src.spec.family
    shape = family.shape(src.spec.config)
    before, after = count_params(model, family), count_params(new, family)
    return {
        "reshape_version": __version__,
        "source": src.name,
        "hub_id": src.hub_id,
        "family": family.name,
        "class": type(new).__name__,
        "plan": plan.to_dict(),
        "source_shape": shape.to_dict(),
        "shape": result_shape(shape, plan).to_dict(),
        "params": {"source": before, "result": after,
                   "saved_fraction": round(1 - after["total"] / before["total"], 6)},
    }


def _input_covariances(model: nn.Module, spec: ModelSpec, plan: Plan, batches=None) -> dict[int, torch.Tensor] | None:
    """Attention-input covariances of the kept layers when the plan splits aware: on the calibration
    batches, or on random inputs without them."""
    if not splits_aware(plan):
        return None
    family = spec.family
    batches = random_inputs(model) if batches is None else batches
    return attention_input_covariances(model, family.layers(model), family.weights, plan.keep, batches)
