"""The `reshape` command: thin commands over the library functions.

Bad input exits with code 2 and one `error: field=value: reason; fix` line per problem on stderr.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(help="Rebuild transformers with more attention heads and fewer layers.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
out_console = Console()
err_console = Console(stderr=True)

Model = Annotated[str, typer.Argument(help="Hub id, local model folder, or preset alias (e.g. minilm, bert-base).")]
Heads = Annotated[Optional[int], typer.Option(help="New number of attention heads.")]
Depth = Annotated[Optional[int], typer.Option(help="New number of layers.")]
Keep = Annotated[Optional[str], typer.Option(help="Explicit layers to keep, e.g. 0,2,4,7,9,11.")]
Select = Annotated[str, typer.Option(help="Layer selection: uniform (first and last kept), first, last.")]
KeepHeadDim = Annotated[bool, typer.Option(
    "--keep-head-dim", help="Keep the head dim and grow the attention width (function-preserving init).")]
Mlp = Annotated[Optional[int], typer.Option(help="New MLP width; keeps the neurons with the largest weight norms.")]
Init = Annotated[str, typer.Option(help="transfer (copy kept layers) or random (fresh init).")]
AllowFewer = Annotated[bool, typer.Option("--allow-fewer-heads", help="Allow fewer heads than the source.")]
Force = Annotated[bool, typer.Option("--force", help="Allow a head dim below 8.")]
Trust = Annotated[bool, typer.Option("--trust-remote-code", help="Run the model repo's own code (off by default).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


@contextmanager
def _user_errors():
    from .errors import ReshapeError

    try:
        yield
    except ReshapeError as e:
        for problem in e.problems:
            err_console.print(f"error: {problem}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _setup(quiet: bool) -> None:
    import transformers

    logging.basicConfig(level=logging.ERROR if quiet else logging.WARNING, format="%(message)s")
    transformers.logging.disable_progress_bar()  # reshape shows its own progress
    if quiet:
        transformers.logging.set_verbosity_error()


def _parse_keep(keep: str | None) -> list[int] | None:
    from .errors import fail

    if keep is None:
        return None
    try:
        return [int(part) for part in keep.split(",") if part.strip()]
    except ValueError:
        raise fail("keep", keep, "is not a comma-separated list of layer indices", "write e.g. --keep 0,2,4") from None


def _plan_options(keep, select, keep_head_dim, mlp, init, allow_fewer_heads, force) -> dict:
    return dict(keep=_parse_keep(keep), select=select, keep_head_dim=keep_head_dim, mlp=mlp, init=init,
                allow_fewer_heads=allow_fewer_heads, force=force)


@app.command()
def convert(
    model: Model,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (must be empty or absent).")],
    heads: Heads = None,
    depth: Depth = None,
    keep: Keep = None,
    select: Select = "uniform",
    keep_head_dim: KeepHeadDim = False,
    mlp: Mlp = None,
    init: Init = "transfer",
    allow_fewer_heads: AllowFewer = False,
    force: Force = False,
    seed: Annotated[int, typer.Option(help="Seed for --init random.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")] = False,
    trust_remote_code: Trust = False,
    quiet: Quiet = False,
    json_output: Json = False,
):
    """Rebuild MODEL with more heads and fewer layers into a standard folder at OUT."""
    _setup(quiet or json_output)
    with _user_errors():
        from . import convert as convert_model
        from .summary import table

        recipe = convert_model(model, out, heads, depth, seed=seed, overwrite=overwrite,
                             trust_remote_code=trust_remote_code, progress=not (quiet or json_output),
                             **_plan_options(keep, select, keep_head_dim, mlp, init, allow_fewer_heads, force))
    if json_output:
        print(json.dumps({"out": str(out), **recipe}, indent=2))
    elif not quiet:
        before = {"shape": recipe["source_shape"], "params": recipe["params"]["source"]}
        after = {"shape": recipe["shape"], "params": recipe["params"]["result"]}
        out_console.print(table(f"{model} -> {out}", before, after))
        out_console.print(f"Kept layers {recipe['plan']['keep']}; saved {recipe['params']['saved_fraction']:.1%} "
                          f"of the parameters. Wrote {out}")


@app.command()
def inspect(
    model: Model,
    heads: Heads = None,
    depth: Depth = None,
    keep: Keep = None,
    select: Select = "uniform",
    keep_head_dim: KeepHeadDim = False,
    mlp: Mlp = None,
    init: Init = "transfer",
    allow_fewer_heads: AllowFewer = False,
    force: Force = False,
    trust_remote_code: Trust = False,
    json_output: Json = False,
):
    """Show MODEL's layers, heads, widths and parameters; with a plan, the result and the savings."""
    _setup(json_output)
    with _user_errors():
        from . import inspect as inspect_model
        from .summary import table

        report = inspect_model(model, heads, depth, trust_remote_code=trust_remote_code,
                     **_plan_options(keep, select, keep_head_dim, mlp, init, allow_fewer_heads, force))
    if json_output:
        print(json.dumps(report, indent=2))
        return
    out_console.print(table(f"{model} ({report['family']})", report["source"], report.get("result")))
    if "plan" in report:
        out_console.print(f"Kept layers: {report['plan']['keep']}")


def main():  # console-script entry point
    app()


if __name__ == "__main__":
    main()
