#!/usr/bin/env python3
"""Which timm architectures reshape takes: doubled heads and about two-thirds depth, per architecture.

    python scripts/coverage_timm.py                 # one architecture per transformer family in timm
    python scripts/coverage_timm.py --json out.json # the same rows as JSON too
    python scripts/coverage_timm.py --all           # every timm architecture with attention (slow)
    python scripts/coverage_timm.py pit_ti_224 ...  # just these

Each model is built by `timm.create_model(name, pretrained=False)` (random weights, default image
size) and given to `reshape.leaner` with doubled heads (per stage where the adapter has stages) and
two thirds of the depth, rounded up. Results:

  native      an adapter rebuilt it with timm.create_model (heads and depth)
  fx          the torch.fx path rewrote it (heads and depth)
  depth-only  heads were refused with a one-line reason; depth alone worked
  refused     a one-line reshape error (printed), even for depth alone
  crash       any other exception: a bug

Every row also checks that the source came out as it went in: same state dict, same outputs on a
fixed input, and no torch.fx Proxy left in any module's attributes (timm caches, e.g. LeViT's
attention_bias_cache); a changed source is reported as a crash. The new model must run on the same
input and give an output of the source's shape.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback

import torch
import torch.fx as fx

FAMILIES = [
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit3_small_patch16_224", "vit_small_patch16_rope_224",
    "beit_base_patch16_224", "eva02_tiny_patch14_224", "cait_xxs24_224", "convit_tiny", "levit_128s",
    "mvitv2_tiny", "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "maxvit_tiny_tf_224", "coat_tiny",
    "twins_svt_small", "pvt_v2_b0", "xcit_nano_12_p16_224", "davit_tiny", "tnt_s_patch16_224", "pit_ti_224",
    "crossvit_tiny_240", "efficientformer_l1", "fastvit_t8", "hiera_tiny_224", "vit_relpos_small_patch16_224",
    "flexivit_small",
]
CONTROLS = ["sequencer2d_s", "resnet18"]  # not transformers: heads must be refused cleanly


def _has_proxy(value, depth=0) -> bool:
    if isinstance(value, fx.Proxy):
        return True
    if depth > 2:
        return False
    if isinstance(value, dict):
        return any(_has_proxy(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return any(_has_proxy(v, depth + 1) for v in value)
    return False


def source_changes(model, before_state, before_out, x) -> str | None:
    """Why the source is not as it went in, or None."""
    after = model.state_dict()
    if after.keys() != before_state.keys() or any(not torch.equal(after[k], before_state[k]) for k in after):
        return "its state dict changed"
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if _has_proxy(value):
                return f"{name or 'model'}.{key} holds a torch.fx Proxy"
    with torch.no_grad():
        out = model(x)
    if not torch.equal(out, before_out):
        return "its outputs changed"
    return None


def plan_numbers(model):
    """Doubled heads and ceil(2/3) depth, per stage where an adapter has stages; for the fx path, from the
    traced block stack. (path, heads, depth, why heads is None)."""
    from reshape.errors import ReshapeError
    from reshape.families import FAMILIES as ADAPTERS
    from reshape.stages import StagedShape

    family = next((f for f in ADAPTERS if f.claims(model)), None)
    if family is not None:
        shape = family.shape(family.spec(model).config)
        if isinstance(shape, StagedShape):
            return ("native", [2 * s.heads for s in shape.stages], [math.ceil(2 * s.layers / 3) for s in shape.stages],
                    "")
        return "native", 2 * shape.heads, math.ceil(2 * shape.layers / 3), ""
    from reshape.fx.rewrite import find_attention
    from reshape.fx.stack import find_stack

    gm, stack = find_stack(model)
    try:
        site = find_attention(gm, stack)
    except ReshapeError as e:  # an untraceable block: depth only
        site = str(e)
    if isinstance(site, str):
        return "fx", None, math.ceil(2 * len(stack.names) / 3), f"in block {stack.names[0]}, {site}"
    return "fx", 2 * site.heads, math.ceil(2 * len(stack.names) / 3), ""


def one(name: str) -> dict:
    import timm

    import reshape
    from reshape.errors import ReshapeError

    row = {"architecture": name, "result": "", "heads": None, "depth": None, "reason": "", "seconds": 0.0}
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        x = torch.randn(1, *size, generator=torch.Generator().manual_seed(0))
        before_state = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            before_out = model(x)
        try:
            path, heads, depth, why = plan_numbers(model)
        except ReshapeError as e:
            row.update(result="refused", reason=str(e))
            return row
        row.update(heads=heads, depth=depth)
        new = None
        if heads is not None:
            try:
                new = reshape.leaner(model, heads=heads, depth=depth)
                row["result"] = path
            except ReshapeError as e:
                row["reason"] = str(e)
        else:
            row["reason"] = f"heads=?: cannot be set: {why}"
        if new is None:
            try:
                new = reshape.leaner(model, depth=depth)
                row.update(result="depth-only", heads=None)
            except ReshapeError as e:
                row.update(result="refused", reason=str(e))
        if new is not None:
            with torch.no_grad():
                out = new.eval()(x)
            if out.shape != before_out.shape:
                raise AssertionError(f"the new model's output has shape {tuple(out.shape)}, "
                                     f"not {tuple(before_out.shape)}")
        changed = source_changes(model, before_state, before_out, x)
        if changed:
            raise AssertionError(f"the source changed: {changed}")
    except Exception as e:  # anything but a one-line reshape error is a bug
        row.update(result="crash", reason=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                   trace=traceback.format_exc())
    finally:
        row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def all_attention_architectures() -> list[str]:
    """One pass over timm's registry: the architectures whose module defines an attention class."""
    import importlib

    import timm

    names = []
    for name in timm.list_models():
        module = importlib.import_module(f"timm.models.{timm.models._registry._model_to_module[name]}")
        if any("Attention" in n for n in vars(module)):
            names.append(name)
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="timm architectures (default: one per family, plus controls)")
    parser.add_argument("--all", action="store_true", help="every timm architecture whose module has attention")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--trace", action="store_true", help="print the traceback of every crash")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    names = args.names or (all_attention_architectures() if args.all else FAMILIES + CONTROLS)
    rows = []
    print(f"{'architecture':34} {'result':10} {'heads':>16} {'depth':>12} {'s':>5}  reason")
    for name in names:
        row = one(name)
        rows.append(row)
        heads = "" if row["heads"] is None else ",".join(map(str, row["heads"])) if isinstance(row["heads"], list) \
            else str(row["heads"])
        depth = "" if row["depth"] is None else ",".join(map(str, row["depth"])) if isinstance(row["depth"], list) \
            else str(row["depth"])
        print(f"{name:34} {row['result']:10} {heads:>16} {depth:>12} {row['seconds']:5.1f}  {row['reason']}",
              flush=True)
        if args.trace and "trace" in row:
            print(row["trace"])
    studied = [r for r in rows if r["architecture"] not in CONTROLS]
    both = sum(r["result"] in ("native", "fx") for r in studied)
    crashes = [r["architecture"] for r in rows if r["result"] == "crash"]
    # A control has no attention: its heads must be refused in one line (its depth may still change, as the
    # fx path changes the depth of any repeated block stack).
    controls = [r for r in rows if r["architecture"] in CONTROLS and r["result"] not in ("refused", "depth-only")]
    print(f"\nheads and depth: {both} of {len(studied)} ({100 * both / max(len(studied), 1):.0f} %); "
          f"native {sum(r['result'] == 'native' for r in studied)}, fx {sum(r['result'] == 'fx' for r in studied)}, "
          f"depth-only {sum(r['result'] == 'depth-only' for r in studied)}, "
          f"refused {sum(r['result'] == 'refused' for r in studied)}, crash {len(crashes)}"
          + (f" ({', '.join(crashes)})" if crashes else ""))
    import timm

    print(f"torch {torch.__version__}, timm {timm.__version__}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "timm": timm.__version__,
                       "rows": [{k: v for k, v in r.items() if k != "trace"} for r in rows]}, f, indent=2)
    return 1 if crashes or controls else 0


if __name__ == "__main__":
    sys.exit(main())
