"""The coverage table: which transformers model types reshape converts, on tiny random configs built offline.

    python scripts/coverage.py                  # the 47 popular types of issue 12, as a table
    python scripts/coverage.py --all            # every model type with a base model in this transformers
    python scripts/coverage.py --all --write docs/reference/families.md

For each type it builds a tiny random model (reshape.testing.tiny_model) and checks that a no-op plan
reproduces the outputs and that doubled heads with two thirds of the depth run (keep-head-dim where
q/k norms over the head dim forbid keep-width). Each type gets one verdict:

  native     both checks pass through a family adapter (declared or generic)
  refused    reshape refused it with a one-line reason (shown)
  crash      any other exception: a bug
  excluded   not in the denominator: not a single-tower attention model (multimodal wrappers, models
             with per-stage or no head counts), or no tiny model could be built from the shared sizes
             in reshape.testing (the reason)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import platform
import signal
import subprocess
import sys
import warnings
from pathlib import Path

POPULAR = ("bert roberta xlm-roberta distilbert albert electra deberta deberta-v2 modernbert mpnet camembert gpt2 "
           "gpt_neo gpt_neox gptj opt bloom falcon phi phi3 llama mistral mixtral qwen2 qwen2_moe qwen3 gemma "
           "gemma2 gemma3_text olmo olmo2 stablelm starcoder2 cohere granite smollm3 vit deit beit dinov2 swin "
           "clip_vision_model siglip_vision_model convnext whisper t5 bart").split()
SECONDS_PER_TYPE = 240


class Timeout(Exception):
    pass


def _alarm(*_):
    raise Timeout()


def excluded_reason(config) -> str | None:
    """Why a config is outside the denominator (not a single-tower attention model), or None."""
    if getattr(config, "sub_configs", None):
        return "multimodal or composite (sub-configs " + ", ".join(sorted(config.sub_configs)) + ")"
    heads = getattr(config, "num_attention_heads", None)
    if getattr(config, "is_encoder_decoder", False):
        return None
    if not isinstance(heads, int) or not isinstance(getattr(config, "num_hidden_layers", None), int):
        return f"no single head count / layer count in its config (num_attention_heads={heads!r})"
    return None


def check(model_type: str) -> tuple[str, str]:
    import torch

    import reshape
    from reshape.errors import ReshapeError
    from reshape.families import find_family
    from reshape.stages import StagedShape
    from reshape.testing import tiny_config, tiny_inputs, tiny_model

    try:
        config = tiny_config(model_type)
        reason = excluded_reason(config)
        if reason and model_type not in POPULAR:
            return "excluded", reason
        model = tiny_model(model_type)
        inputs = tiny_inputs(model)
        with torch.no_grad():
            model(**inputs)
    except Timeout:
        raise
    except Exception as e:  # the type's own code: a download, an extra package, a config we cannot size
        if model_type in POPULAR:
            return "crash", f"tiny model not built: {type(e).__name__}: {_line(e)}"
        return "excluded", f"no tiny model from the shared sizes ({type(e).__name__}: {_line(e)})"

    def first(out):
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def run(m):  # seeded: some models draw at random in their forward (ViT-MAE's masking)
        torch.manual_seed(0)
        return first(m(**inputs))

    try:
        family = find_family(model)
        shape = family.shape(model.config)
        stages = shape.stages if isinstance(shape, StagedShape) else [shape]

        def per(values):
            return values if len(values) > 1 else values[0]

        same = reshape.leaner(model, heads=per([s.heads for s in stages]), depth=per([s.layers for s in stages]))
        with torch.no_grad():
            if not torch.allclose(run(same), run(model), atol=1e-5):
                return "crash", "a no-op plan changed the outputs"
        heads, depth = per([2 * s.heads for s in stages]), per([-(-2 * s.layers // 3) for s in stages])
        try:
            new = reshape.leaner(model, heads=heads, depth=depth)
            mode = ""
        except ReshapeError as e:
            if "--keep-head-dim" not in str(e):
                raise
            new = reshape.leaner(model, heads=heads, depth=depth, keep_head_dim=True)
            mode = ", keep-head-dim"
            # keep-head-dim is counted only where it keeps its promise: at full depth, the same outputs
            wide = reshape.leaner(model, heads=heads, depth=per([s.layers for s in stages]), keep_head_dim=True)
            with torch.no_grad():
                if not torch.allclose(run(wide), run(model), atol=1e-4, rtol=1e-3):
                    return "crash", "keep-head-dim with doubled heads changed the outputs"
        with torch.no_grad():
            run(new)
        return "native", f"{family.name}: heads {heads}, depth {depth}{mode}"
    except ReshapeError as e:
        return "refused", _line(e)
    except Timeout:
        raise
    except Exception as e:
        return "crash", f"{type(e).__name__}: {_line(e)}"


def work(types: list[str]) -> None:
    """Check types in this process, one JSON line each ("building" first, so a death can be placed)."""
    signal.signal(signal.SIGALRM, _alarm)
    for model_type in types:
        print(json.dumps({"building": model_type}), flush=True)
        signal.alarm(SECONDS_PER_TYPE)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                verdict, detail = check(model_type)
        except Timeout:
            verdict, detail = ("crash" if model_type in POPULAR else "excluded"), f"over {SECONDS_PER_TYPE} s"
        finally:
            signal.alarm(0)
        print(json.dumps({"type": model_type, "verdict": verdict, "detail": detail}), flush=True)


def supervise(types: list[str]) -> list[tuple[str, str, str]]:
    """Run a worker process over `types`; if it dies (a tiny config that asks for gigabytes can bring
    the kernel's OOM killer), the type it was on is recorded and the caller starts another for the rest."""
    command = [sys.executable, __file__, "--worker", *types]
    rows, current = [], None
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as worker:
        for line in worker.stdout:
            if not line.startswith("{"):  # something a model's code printed
                continue
            record = json.loads(line)
            if "building" in record:
                current = record["building"]
                continue
            rows.append((record["type"], record["verdict"], record["detail"]))
            print(f"{record['type']:32s} {record['verdict']:9s} {record['detail']}", flush=True)
    if len(rows) < len(types):
        verdict = "crash" if current in POPULAR else "excluded"
        rows.append((current, verdict, f"the checking process died (exit {worker.returncode}, e.g. out of memory)"))
        print(f"{current:32s} {verdict:9s} {rows[-1][2]}", flush=True)
    return rows


def _line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else "no message")[:220].replace("|", "/")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every model type with a base model, not only the 47")
    parser.add_argument("--write", type=Path, help="write the table as Markdown to this file")
    parser.add_argument("types", nargs="*", help="model types to check (default: the 47, or --all)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    import reshape

    transformers.logging.set_verbosity_error()
    types = args.types or (sorted(MODEL_MAPPING_NAMES) if args.all else POPULAR)
    if args.worker:
        work(types)
        return
    rows = []
    while len(rows) < len(types):
        rows += supervise(types[len(rows):])
    counted = [r for r in rows if r[1] != "excluded"]
    native = sum(r[1] == "native" for r in counted)
    tally = {v: sum(r[1] == v for r in rows) for v in ("native", "refused", "crash", "excluded")}
    summary = (f"{native} of {len(counted)} model types native ({native / max(len(counted), 1):.1%}); "
               + ", ".join(f"{n} {v}" for v, n in tally.items()))
    print(summary)
    if args.write:
        versions = (f"reshape {reshape.__version__}, transformers {transformers.__version__}, "
                    f"torch {torch.__version__}, Python {platform.python_version()}")
        lines = ["| model type | verdict | detail |", "|---|---|---|"]
        lines += [f"| `{t}` | {v} | {d} |" for t, v, d in rows]
        command = "python scripts/coverage.py" + (" --all" if args.all else "") + f" --write {args.write}"
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(HEADER.format(command=command, versions=versions, summary=summary)
                              + "\n".join(lines) + "\n")
    sys.exit(1 if tally["crash"] else 0)


HEADER = """# Model coverage

Generated by `{command}` against {versions}. Do not edit by hand.

Each model type is built as a tiny random config in code, offline (`reshape.testing.tiny_model`). *native*:
a no-op plan reproduces the outputs and doubled heads with two thirds of the depth run (keep-head-dim where
q/k norms over the head dim forbid keep-width). *refused*: a one-line reason. *crash*: a bug. *excluded*:
outside the denominator (multimodal wrappers, models with per-stage or no head counts, types whose tiny model
cannot be built from the shared sizes in `reshape.testing`), with the reason. The 47 popular types are also checked, with plain-transformers
reloads, by `tests/families/test_conformance.py`.

**{summary}**

"""


if __name__ == "__main__":
    main()
