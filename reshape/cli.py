"""The `reshape` command: thin commands over the library functions.

Bad input exits with code 2 and one `error: field=value: reason; fix` line per problem on stderr.

Each option is declared once, as an Annotated alias (name, help); options that several commands take
together are a dataclass group with their defaults (PlanFlags: convert and inspect; TrainFlags: finetune
and distill; OutputFlags: --quiet, --json and --push-to-hub of convert, finetune and distill), which
`_with_groups` spreads into each command's options.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass
from functools import wraps
from inspect import Parameter, Signature, signature
from pathlib import Path
from typing import Annotated, Optional, get_type_hints

import typer
from rich.console import Console

# rich_markup_mode=None: plain click help. Typer's rich help imports rich's markdown and syntax modules,
# about 0.4 s of the ~1 s that `reshape --help` took (python -X importtime).
app = typer.Typer(help="Rebuild transformers with more attention heads and fewer layers.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
out_console = Console()
err_console = Console(stderr=True)

Model = Annotated[str, typer.Argument(help="Hub id, local model folder, or preset alias (e.g. minilm, bert-base); "
                                           "for convert also a timm architecture or package.module:function "
                                           "(the torch.fx path).")]
Heads = Annotated[Optional[str], typer.Option(
    help="New number of attention heads; one per stage for hierarchical models, e.g. 6,12,24,48.")]
Depth = Annotated[Optional[str], typer.Option(
    help="New number of layers; one per stage for hierarchical models, e.g. 1,1,5,1.")]
InnerHeads = Annotated[Optional[int], typer.Option(help="New heads of an inner attention (TNT's pixel attention).")]
Keep = Annotated[Optional[str], typer.Option(help="Explicit layers to keep, e.g. 0,2,4,7,9,11.")]
Select = Annotated[Optional[str], typer.Option(
    help="Layer selection: uniform (first and last kept), first, last, or importance (Block Influence on "
         "--calib, else on random tokens). Default: importance for decoder-only language models, else uniform.")]
KeepHeadDim = Annotated[bool, typer.Option(
    "--keep-head-dim", help="Keep the head dim and grow the attention width (function-preserving init).")]
Mlp = Annotated[Optional[int], typer.Option(help="New MLP width; keeps the neurons with the largest weight norms.")]
Init = Annotated[str, typer.Option(help="transfer (copy kept layers) or random (fresh init).")]
HeadSplit = Annotated[Optional[str], typer.Option(
    help="How each head is split into narrower ones: aware (keeps each head's attention pattern; the default "
         "where it applies) or contiguous (weights copied as they are).")]
AllowFewer = Annotated[bool, typer.Option("--allow-fewer-heads", help="Allow fewer heads than the source.")]
Force = Annotated[bool, typer.Option("--force", help="Allow a head dim below 8.")]
Trust = Annotated[bool, typer.Option("--trust-remote-code", help="Run the model repo's own code (off by default).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder (must be empty or absent).")]
PushToHub = Annotated[Optional[str], typer.Option(
    "--push-to-hub", metavar="OWNER/NAME", help="Then upload OUT to this Hub repo (see `reshape push`).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")]


def _with_groups(**defaults):
    """Let a command take groups of options declared once (the dataclasses below): typer sees each parameter
    typed with a group as the group's options, in its place, and the command gets the group filled in.
    `defaults` changes a group option's default for this one command (distill's --lr)."""
    def wrap(command):
        hints = get_type_hints(command, include_extras=True)
        params, groups = [], {}
        for name, param in signature(command).parameters.items():
            group = hints[name]
            if isinstance(group, type) and is_dataclass(group):
                groups[name] = group
                # the aliases live in the command's globals (under runpy this module is in no sys.modules)
                group_hints = get_type_hints(group, command.__globals__, include_extras=True)
                params += [Parameter(f.name, Parameter.KEYWORD_ONLY, annotation=group_hints[f.name],
                                     default=defaults.pop(f.name, f.default)) for f in fields(group)]
            else:
                params.append(param.replace(kind=Parameter.KEYWORD_ONLY, annotation=group))
        if defaults:
            raise TypeError(f"{command.__name__} takes no group option {', '.join(defaults)}")

        @wraps(command)
        def run(**values):
            for name, group in groups.items():
                values[name] = group(**{f.name: values.pop(f.name) for f in fields(group)})
            return command(**values)

        run.__signature__ = Signature(params)  # what typer reads (a name in two groups is refused here)
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return wrap


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
    """Logging; no progress bars from transformers and the Hub (reshape shows its own progress), and with
    `quiet` none of transformers' warnings. Said through the settings they read when imported, unless they
    are imported already: a command that never needs them (inspect of a known config) does not import them
    here (transformers alone takes 0.7 s)."""
    logging.basicConfig(level=logging.ERROR if quiet else logging.WARNING, format="%(message)s")
    if "transformers" in sys.modules:
        import transformers

        transformers.logging.disable_progress_bar()
        if quiet:
            transformers.logging.set_verbosity_error()
        return
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # what transformers reads for its own bars when imported
    else:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if quiet:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"


def _parse_indices(value: str | None, field: str) -> list[int] | None:
    from .errors import fail

    if value is None:
        return None
    fix = f"write e.g. --{field.replace('_', '-')} 0,2,4"
    parts = value.split(",")
    if any(not part.strip() for part in parts):  # "4,," must not pass as 4
        raise fail(field, value, "has an empty item" if value.strip() else "is empty", fix)
    try:
        return [int(part) for part in parts]
    except ValueError:
        raise fail(field, value, "is not a comma-separated list of whole numbers", fix) from None


def _parse_count(value: str | None, field: str) -> int | list[int] | None:
    """A number, or a comma-separated list of numbers (one per stage)."""
    counts = _parse_indices(value, field)
    return counts[0] if counts and len(counts) == 1 and "," not in value else counts


@dataclass
class PlanFlags:
    """The plan: what convert and inspect both take."""

    heads: Heads = None
    depth: Depth = None
    inner_heads: InnerHeads = None
    keep: Keep = None
    select: Select = None
    keep_head_dim: KeepHeadDim = False
    mlp: Mlp = None
    init: Init = "transfer"
    head_split: HeadSplit = None
    allow_fewer_heads: AllowFewer = False
    force: Force = False

    def options(self) -> dict:
        """The keyword arguments of reshape.convert and reshape.inspect; bad lists raise ReshapeError."""
        options = dict(heads=_parse_count(self.heads, "heads"), depth=_parse_count(self.depth, "depth"),
                       keep=_parse_indices(self.keep, "keep"), keep_head_dim=self.keep_head_dim, mlp=self.mlp,
                       init=self.init, head_split=self.head_split, allow_fewer_heads=self.allow_fewer_heads,
                       force=self.force, inner_heads=self.inner_heads)
        return options if self.select is None else {**options, "select": self.select}  # None: the model's default


@dataclass
class OutputFlags:
    """What a command that writes OUT prints, and where it uploads OUT: convert, finetune and distill."""

    quiet: Quiet = False
    json_output: Json = False
    push_to_hub: PushToHub = None

    @property
    def silent(self) -> bool:
        return self.quiet or self.json_output

    def check_push(self) -> None:
        """--push-to-hub: a bad repo id or a missing token is refused before the work, not after it."""
        if self.push_to_hub is not None:
            from .hub import check_target

            check_target(self.push_to_hub)

    def push(self, out: Path) -> None:
        """--push-to-hub: upload the folder the command just wrote (the first process only, under accelerate)."""
        if not self.push_to_hub:
            return
        from .train.loop import is_main_process

        if not is_main_process():
            return
        with _user_errors():
            from .hub import push as run

            result = run(out, self.push_to_hub)
        if not self.silent:
            err_console.print(f"Pushed {out} to {self.push_to_hub}: {result['url']}", markup=False, highlight=False)


@app.command()
@_with_groups()
def convert(
    model: Model,
    out: Out,
    *,
    plan: PlanFlags,
    seed: Annotated[int, typer.Option(help="Seed for --init random.")] = 0,
    calib: Annotated[Optional[str], typer.Option(
        help="Text that --select importance scores the layers on and the aware head split is fitted on "
             "(recipe, file or Hub dataset; random inputs without it).")] = None,
    overwrite: Overwrite = False,
    trust_remote_code: Trust = False,
    output: OutputFlags,
):
    """Rebuild MODEL with more heads and fewer layers into a standard folder at OUT."""
    _setup(output.silent)
    with _user_errors():
        from . import convert as convert_model
        from .summary import table

        output.check_push()
        recipe = convert_model(model, out, seed=seed, overwrite=overwrite, calib=calib,
                               trust_remote_code=trust_remote_code, progress=not output.silent, **plan.options())
    if output.json_output:
        print(json.dumps({"out": str(out), **recipe}, indent=2))
    elif not output.quiet:
        before = {"shape": recipe["source_shape"], "params": recipe["params"]["source"]}
        after = {"shape": recipe["shape"], "params": recipe["params"]["result"]}
        out_console.print(table(f"{model} -> {out}", before, after))
        if "layer_scores" in recipe:
            scores = ", ".join(f"{i}: {v:.4f}" for i, v in enumerate(recipe["layer_scores"]["scores"]))
            out_console.print(f"Block influence per source layer on {recipe['layer_scores']['calib']}: {scores}")
        split = (f"; aware head split fitted on {recipe['head_split_calib']}" if "head_split_calib" in recipe
                 else "")
        out_console.print(f"Kept layers {recipe['plan']['keep']}{split}; saved "
                          f"{recipe['params']['saved_fraction']:.1%} of the parameters. Wrote {out}")
    output.push(out)


@app.command()
@_with_groups()
def inspect(model: Model, *, plan: PlanFlags, trust_remote_code: Trust = False, json_output: Json = False):
    """Show MODEL's layers, heads, widths and parameters; with a plan, the result and the savings."""
    _setup(json_output)
    with _user_errors():
        from . import inspect as inspect_model
        from .summary import table

        report = inspect_model(model, trust_remote_code=trust_remote_code, **plan.options())
    if json_output:
        print(json.dumps(report, indent=2))
        return
    out_console.print(table(f"{model} ({report['family']})", report["source"], report.get("result")))
    if "plan" in report and report["plan"]["keep"] == "by importance":
        out_console.print("Kept layers: chosen by convert from their Block Influence (on --calib data, else on "
                          "random tokens)")
    elif "plan" in report:
        out_console.print(f"Kept layers: {report['plan']['keep']}")


Data = Annotated[str, typer.Option(help="Recipe name (rotten-tomatoes, hamlet, ...), a local file or folder, "
                                          "or a Hub dataset id, with its config as ID:CONFIG (nyu-mll/glue:sst2).")]
TextColumn = Annotated[Optional[str], typer.Option(
    help="Text column, or for token-cls the column of word lists (guessed when absent).")]
LabelColumn = Annotated[Optional[str], typer.Option(
    help="Label column, or for token-cls the column of per-word tags (guessed when absent).")]
ImageColumn = Annotated[Optional[str], typer.Option(help="Image column for image-cls (guessed when absent).")]
Task = Annotated[str, typer.Option(help="seq-cls, token-cls, masked-lm, causal-lm or image-cls.")]
Steps = Annotated[Optional[int], typer.Option(help="Optimizer steps (overrides --epochs).")]
Epochs = Annotated[Optional[float], typer.Option(
    help="Passes over the training split. With neither --steps nor --epochs: at least 300 steps in whole "
         "epochs, evaluated every twentieth of them, stopped early after 5 evaluations without a better "
         "validation score.")]
BatchSize = Annotated[int, typer.Option(help="Examples per batch and process.")]
Lr = Annotated[float, typer.Option(help="Peak learning rate (linear warm-up and decay).")]
GradAccum = Annotated[int, typer.Option(help="Batches per optimizer step.")]
EvalEvery = Annotated[Optional[int], typer.Option(
    help="Evaluate on the validation split every N steps (default: at the end, or see --epochs).")]
SaveEvery = Annotated[Optional[int], typer.Option(
    help="Write OUT/checkpoints/last every N steps (default 100), besides at every evaluation, at the end and "
         "on Ctrl-C or SIGTERM: what --resume continues from, so a kill -9 loses at most N steps.")]
Patience = Annotated[Optional[int], typer.Option(
    help="Stop after N evaluations without a better validation score (default: 5 with the automatic budget, "
         "else off).")]
MaxLength = Annotated[Optional[int], typer.Option(
    help="Tokens per example after truncation, within the model's positions (default: 128, or fewer if it takes "
         "fewer).")]
Seed = Annotated[int, typer.Option(help="Seed for data order, dropout and fresh heads.")]
Precision = Annotated[str, typer.Option(help="auto (bf16 on a supporting GPU), no, fp16 or bf16.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from OUT's last checkpoint.")]
KeepCheckpoints = Annotated[bool, typer.Option("--keep-checkpoints", help="Keep OUT/checkpoints after training.")]
LogKappa = Annotated[bool, typer.Option("--log-kappa", help="Log each layer's attention κ at every evaluation "
                                                            "(OUT/metrics.jsonl).")]


# The automatic budget, when neither --steps nor --epochs is given: small data gets several passes, and
# early stopping on validation ends the run once it stops improving (docs/guides/recover.md).
AUTO_MIN_STEPS, AUTO_PATIENCE = 300, 5


@dataclass
class TrainFlags:
    """The training run: what finetune and distill both take (distill changes --lr's default)."""

    steps: Steps = None
    epochs: Epochs = None
    batch_size: BatchSize = 32
    lr: Lr = 5e-5
    grad_accum: GradAccum = 1
    eval_every: EvalEvery = None
    patience: Patience = None
    max_length: MaxLength = None
    seed: Seed = 0
    mixed_precision: Precision = "auto"
    save_every: SaveEvery = None
    resume: Resume = False
    overwrite: Overwrite = False
    keep_checkpoints: KeepCheckpoints = False
    log_kappa: LogKappa = False

    def config(self):
        """The TrainConfig; with neither --steps nor --epochs, the automatic budget."""
        from .train.loop import TrainConfig

        automatic = self.steps is None and self.epochs is None
        return TrainConfig(max_steps=self.steps, epochs=1.0 if self.epochs is None else self.epochs,
                           batch_size=self.batch_size, lr=self.lr, grad_accum=self.grad_accum,
                           eval_every=self.eval_every, seed=self.seed, mixed_precision=self.mixed_precision,
                           min_steps=AUTO_MIN_STEPS if automatic else None,
                           patience=self.patience if self.patience is not None else
                           (AUTO_PATIENCE if automatic else None),
                           **({} if self.save_every is None else {"save_every": self.save_every}))  # None: its default

    def run_options(self, output: OutputFlags) -> dict:
        """The keyword arguments that train.finetune.finetune and train.distill.distill both take."""
        return dict(max_length=self.max_length, resume=self.resume, overwrite=self.overwrite,
                    keep_checkpoints=self.keep_checkpoints, log_kappa=self.log_kappa, progress=not output.silent,
                    config=self.config())


def _print_result(result: dict, json_output: bool, quiet: bool, title: str) -> None:
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch, the first process speaks for all
        return
    if json_output:
        print(json.dumps(result, indent=2, default=str))
    elif not quiet:
        parts = [(split, result[split]) for split in ("validation", "test") if result.get(split)] or [("", result)]
        text = "; ".join((f"{split} " if split else "") + ", ".join(
            f"{k} {v:.4g}" for k, v in scores.items() if isinstance(v, (int, float)) and k not in ("score", "step"))
            for split, scores in parts)
        out_console.print(f"{title}: {text}")


@app.command()
@_with_groups()
def finetune(
    model: Model, task: Task, data: Data, out: Out,
    text_column: TextColumn = None, label_column: LabelColumn = None, image_column: ImageColumn = None,
    lora: Annotated[Optional[int], typer.Option(help="Train LoRA adapters of this rank; merged on save.")] = None,
    *, train: TrainFlags, output: OutputFlags,
    validation_ratio: Annotated[float, typer.Option(
        help="Fraction of the training rows held out for validation (which picks the checkpoint) when DATA "
             "has no validation split of its own; recipes have fixed splits.")] = 0.1,
):
    """Fine-tune MODEL on a task; write the checkpoint best on validation to OUT, and score it once on test."""
    _setup(output.silent)
    with _user_errors():
        from .train.finetune import finetune as run

        output.check_push()
        result = run(model, out, task=task, data=data, text_column=text_column, label_column=label_column,
                     image_column=image_column, lora=lora, validation_ratio=validation_ratio,
                     **train.run_options(output))
    _print_result(result, output.json_output, output.quiet, f"Wrote {out}")
    output.push(out)


@app.command("eval")
def evaluate(
    model: Model,
    task: Annotated[str, typer.Option(help="seq-cls, token-cls, masked-lm, causal-lm, image-cls, or embedding "
                                           "(cosine to --teacher's sentence embeddings).")],
    data: Data, text_column: TextColumn = None, label_column: LabelColumn = None, image_column: ImageColumn = None,
    teacher: Annotated[Optional[str], typer.Option(help="For --task embedding: the model to compare with.")] = None,
    max_length: MaxLength = None, seed: Seed = 0, json_output: Json = False,
    split: Annotated[str, typer.Option(help="train, validation or test.")] = "test",
):
    """Score MODEL on a split of DATA (test by default): accuracy and F1, perplexity, or cosine to a teacher."""
    _setup(json_output)
    with _user_errors():
        from .train.finetune import evaluate as run

        result = run(model, task=task, data=data, text_column=text_column, label_column=label_column,
                     image_column=image_column, teacher=teacher, max_length=max_length, seed=seed, split=split)
    _print_result(result, json_output, False, f"{model} on {data}")


TeacherCache = Annotated[Optional[Path], typer.Option(
    metavar="DIR", help="Keep the teacher's outputs on the distillation data here: written by one pass of the "
                        "teacher if absent, then read instead of loading the teacher (hidden states in bf16, a "
                        "vocabulary's top-64 logits). Refused with --relation.")]


@app.command()
@_with_groups(lr=1e-4)
def distill(
    teacher: Annotated[str, typer.Option(help="The source model (alias, folder or Hub id).")],
    student: Annotated[str, typer.Option(help="The converted model folder (with its reshape.json).")],
    data: Data, out: Out,
    task: Annotated[Optional[str], typer.Option(
        help="seq-cls or token-cls: DATA carries labels, the TEACHER is fine-tuned on them, and the student "
             "also learns the labels (from the teacher's head).")] = None,
    text_column: TextColumn = None, label_column: LabelColumn = None,
    kl: Annotated[float, typer.Option(help="Weight of the logit KL term.")] = 1.0,
    hidden: Annotated[float, typer.Option(help="Weight of the hidden-state term.")] = 1.0,
    pooled: Annotated[float, typer.Option(help="Weight of the pooled-embedding cosine term.")] = 0.0,
    task_weight: Annotated[float, typer.Option(help="Weight of the cross entropy against the labels (--task).")] = 1.0,
    relation: Annotated[float, typer.Option(
        help="Weight of the MiniLMv2 attention-relation term (Q-Q, K-K, V-V; any head counts).")] = 0.0,
    relation_heads: Annotated[Optional[int], typer.Option(
        help="Relation heads for --relation (default: the most, up to the teacher's heads, that fit).")] = None,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the KL term.")] = 2.0,
    hidden_kind: Annotated[str, typer.Option(help="mse or cosine.")] = "mse",
    layer_map: Annotated[Optional[str], typer.Option(
        help="Teacher layer for each student layer, e.g. 0,2,3,5 (default: reshape.json's kept layers).")] = None,
    teacher_cache: TeacherCache = None,
    *, train: TrainFlags, output: OutputFlags,
):
    """Distil the STUDENT from the TEACHER on text (or on a labelled task); write it to OUT."""
    _setup(output.silent)
    with _user_errors():
        from .train.distill import distill as run
        from .train.losses import DistillWeights

        output.check_push()
        result = run(teacher, student, out, data=data, task=task, text_column=text_column, label_column=label_column,
                     weights=DistillWeights(kl=kl, hidden=hidden, pooled=pooled, relation=relation, task=task_weight),
                     temperature=temperature, hidden_kind=hidden_kind, relation_heads=relation_heads,
                     explicit_map=_parse_indices(layer_map, "layer_map"), teacher_cache=teacher_cache,
                     **train.run_options(output))
    _print_result(result, output.json_output, output.quiet, f"Wrote {out}")
    output.push(out)


@app.command()
def push(
    out: Annotated[Path, typer.Argument(help="An output folder of convert, distill or finetune.")],
    repo: Annotated[str, typer.Option(metavar="OWNER/NAME", help="The Hub model repo (created if absent).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    revision: Annotated[Optional[str], typer.Option(help="Branch to commit to (created if absent; default main).")]
    = None,
    commit_message: Annotated[Optional[str], typer.Option(help="The commit message.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the files and the card that would be uploaded; "
                                                            "upload nothing (no token needed).")] = False,
    json_output: Json = False,
):
    """Upload OUT and its model card to the Hugging Face Hub in one commit (token: HF_TOKEN or `hf auth login`)."""
    _setup(json_output)
    with _user_errors():
        from .hub import push as run

        result = run(out, repo, private=private, revision=revision, commit_message=commit_message, dry_run=dry_run)
    if json_output:
        print(json.dumps(result, indent=2))
        return
    from .summary import push_table

    out_console.print(push_table(out, repo, result))
    if dry_run:
        out_console.print(result["card"] or "(no README.md: the repo would have no model card)", markup=False,
                          highlight=False)
        out_console.print(f"Dry run: nothing uploaded; {len(result['files'])} files would go to {repo}.")
    else:
        out_console.print(f"Pushed {len(result['files'])} files to {repo}: {result['url']}")


@app.command()
def presets(json_output: Json = False):
    """List the preset aliases: Hub id, family, recommended heads and depth, and where that comes from."""
    from dataclasses import asdict

    from .presets import load_presets
    from .summary import presets_table

    found = load_presets()
    if json_output:
        print(json.dumps({alias: asdict(p) for alias, p in found.items()}, indent=2))
        return
    out_console.print(presets_table(found))


@app.command()
def report(
    base: Annotated[str, typer.Argument(help="The source model (alias, folder or Hub id).")],
    leaner: Annotated[str, typer.Argument(help="The converted model to compare with it.")],
    data: Annotated[Optional[str], typer.Option(help="Data to score both on (with --task); conditioning is "
                                                     "then measured on its text.")] = None,
    task: Annotated[Optional[str], typer.Option(help="Task for --data: seq-cls, token-cls, masked-lm, causal-lm, "
                                                     "image-cls.")] = None,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes to time, comma-separated.")] = "1,32",
    seq_len: Annotated[int, typer.Option(help="Tokens per text sample for FLOPs, latency and memory.")] = 128,
    repeats: Annotated[int, typer.Option(help="Timed runs per batch size (after 3 warm-up runs).")] = 10,
    no_kappa: Annotated[bool, typer.Option("--no-kappa", help="Skip the conditioning probe.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for report.json, report.md and "
                                                                    "plots (must be empty or absent).")] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_output: Json = False,
):
    """Measure BASE and LEANER side by side: parameters, FLOPs, latency, memory, conditioning, quality."""
    _setup(quiet or json_output)
    with _user_errors():
        from .reporting import report as run
        from .reporting import show

        sizes = _parse_indices(batch_sizes, "batch_sizes")
        say = None if quiet or json_output else (lambda text: err_console.print(f"[dim]{text}…[/dim]"))
        result = run(base, leaner, data=data, task=task, batch_sizes=tuple(sizes), seq_len=seq_len, repeats=repeats,
                     kappa=not no_kappa, out=out, overwrite=overwrite, progress=say)
    if json_output:
        print(json.dumps(result, indent=2))
        return
    if quiet:
        return
    show(result, base, leaner, out_console)
    if out:
        out_console.print(f"Wrote {out}/report.json, report.md and plots")


@app.command()
def sweep(
    model: Model,
    heads: Annotated[str, typer.Option(help="Head counts to try, comma-separated, e.g. 12,24,48.")],
    depth: Annotated[str, typer.Option(help="Depths to try, comma-separated, e.g. 2,3,4.")],
    data: Data, task: Task, out: Out,
    budget: Annotated[int, typer.Option(help="Optimizer steps of fine-tuning (and of distillation) per point.")],
    seeds: Annotated[int, typer.Option(help="Runs per point with different seeds (mean ± std).")] = 1,
    init: Init = "transfer",
    distill_data: Annotated[Optional[str], typer.Option(
        help="Text to distil each converted point on before fine-tuning (with --init transfer).")] = None,
    breaks_below: Annotated[float, typer.Option(
        help="Report the first point whose score falls below this fraction of the source's.")] = 0.98,
    batch_size: BatchSize = 32, lr: Lr = 5e-5, max_length: MaxLength = None, teacher_cache: TeacherCache = None,
    quiet: Quiet = False, json_output: Json = False,
):
    """Convert, recover and score MODEL at every heads x depth point, with same-heads controls; resumable."""
    _setup(True)  # a sweep's own progress lines replace the per-run output
    with _user_errors():
        from .sweep import markdown
        from .sweep import sweep as run

        say = None if quiet or json_output else (lambda text: err_console.print(text, markup=False))
        results = run(model, out, heads=_parse_indices(heads, "heads"), depths=_parse_indices(depth, "depth"),
                      data=data, task=task, budget=budget, seeds=seeds, init=init, distill_data=distill_data,
                      breaks_below=breaks_below, batch_size=batch_size, lr=lr, max_length=max_length,
                      teacher_cache=teacher_cache, progress=say)
    if json_output:
        print(json.dumps(results, indent=2))
    elif not quiet:
        out_console.print(markdown(results), markup=False, highlight=False)
        out_console.print(f"Wrote {out}/results.json, results.md and pareto.png")


def main():  # console-script entry point
    app()


if __name__ == "__main__":
    main()
