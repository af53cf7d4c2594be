"""Fuzz the CLI: hypothesis draws values for every option of every command that takes numbers or paths
(issue 15, item 6). Whatever it draws, a command either works (exit 0) or refuses with one-line errors
(exit 2): never a traceback, and a refused command leaves nothing behind.

Values are ints, negatives, zero, huge numbers, floats (nan, inf), strings, empty strings and lists with
gaps. Options that only cost time when valid (--steps, --budget, --repeats, ...) are valid only at their
smallest, so a run that does start trains one step on a tiny model. The example budget is fixed and the
draws derandomized: CI runs the same examples every time. Nothing reaches the network: Hub access is
offline, there is no token, and the endpoint is a closed local port.

    RESHAPE_FUZZ_SCALE=10 python -m pytest tests/test_fuzz_cli.py   # ten times the examples, drawn afresh
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from helpers.cli_in_process import invoke, left_behind, tiny_project


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from huggingface_hub import constants

    root = tmp_path_factory.mktemp("fuzz")
    files = tiny_project(root)
    with pytest.MonkeyPatch.context() as patch:  # module-wide: hypothesis reruns a test, not its fixtures
        patch.delenv("HF_TOKEN", raising=False)
        patch.setattr(constants, "HF_TOKEN_PATH", str(root / "no-token"))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: a request would fail at once
        yield {**{name: str(path) for name, path in files.items()}, "root": root}


# --- values ----------------------------------------------------------------------------------------

INTS = st.one_of(st.integers(-2, 4), st.sampled_from([10**6, 10**20, -(10**20), 2**64])).map(str)
REALS = st.sampled_from(["0", "-1", "0.5", "1", "2.5", "nan", "inf", "-inf", "1e-12", "1e300", "-0.0"])
STRINGS = st.sampled_from(["", " ", "x", "é", "a b", "--json", "-", "1.5", "0x10"])
LISTS = st.lists(st.one_of(st.integers(-1, 5).map(str), st.sampled_from(["", " ", "x", "99999999999999999999"])),
                 min_size=1, max_size=4).map(",".join)
JUNK = st.one_of(INTS, REALS, STRINGS, LISTS)
# Bad values for a count that costs time when valid (--steps, --budget, ...): valid huge ones are left out.
BAD_COUNT = st.sampled_from(["0", "-1", "-99999999999999999999", "x", "", " ", "1.5", "nan", "1,2", "4,,"])


def small_list(value: str) -> bool:
    """A list any command must refuse, or a valid one of small numbers (a valid huge one costs time)."""
    try:
        numbers = [int(part) for part in value.split(",")]
    except ValueError:
        return True
    return any(n < 1 for n in numbers) or all(n <= 4 for n in numbers)


class Opt:
    """An argument: sensible values, and the bad ones the fuzzer tries instead."""

    def __init__(self, *good, bad=JUNK, required=False):
        self.good = st.sampled_from([str(g) for g in good]) if good else None  # None: only ever drawn bad
        self.bad = bad
        self.required = required


FLAG = Opt()


def draw_args(drawn, positional: list[Opt], options: dict[str, Opt], least_bad: int = 0) -> list[str]:
    """A command line that is sensible but for up to two arguments drawn bad (at least `least_bad`: for
    commands whose runs cost seconds): sensible enough to get past the first refusal, so each example
    probes the checks (and the work) behind it."""
    names = [str(i) for i in range(len(positional))] + [n for n, opt in options.items() if opt is not FLAG]
    spoiled = set(drawn.draw(st.lists(st.sampled_from(names), min_size=least_bad, max_size=2, unique=True)))
    args = [drawn.draw(opt.bad if str(i) in spoiled else opt.good) for i, opt in enumerate(positional)]
    for name, opt in options.items():
        flag = "--" + name.replace("_", "-")
        if opt is FLAG:
            args += [flag] if drawn.draw(st.booleans()) else []
        elif name in spoiled:
            args += [flag, drawn.draw(opt.bad)]
        elif opt.good is not None and (opt.required or drawn.draw(st.booleans())):
            args += [flag, drawn.draw(opt.good)]
    return args


def check(args: list[str], out: Path | None = None) -> None:
    run = invoke(*args)
    event(f"exit {run.code}")  # pytest --hypothesis-show-statistics: how many ran and how many were refused
    shown = " ".join(map(repr, args))
    assert run.code in (0, 2), f"exit {run.code} for {shown}: {run.exception!r}\n{run.output[-3000:]}"
    assert run.exception is None or isinstance(run.exception, SystemExit), f"{shown}: {run.exception!r}"
    assert "Traceback" not in run.output, f"{shown}\n{run.output[-3000:]}"
    if run.code == 2:
        assert run.errors or "Usage:" in run.output, f"{shown}: no error line\n{run.output[-3000:]}"
        if out is not None:
            assert left_behind(out) == [], f"{shown} left {left_behind(out)}\n{run.output[-3000:]}"


def fresh_out(tiny) -> Path:
    """An OUT that does not exist yet, in a parent of its own."""
    return Path(tempfile.mkdtemp(dir=tiny["root"])) / "out"


def fuzz(max_examples: int):
    """CI's fixed budget, the same examples every run; RESHAPE_FUZZ_SCALE=N draws N times as many, afresh.
    No shrinking: a failing command line is printed as drawn, and shrinking reruns it dozens of times."""
    scale = int(os.environ.get("RESHAPE_FUZZ_SCALE", "1"))
    return settings(max_examples=max_examples * scale, deadline=None, derandomize=scale == 1, database=None,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


def model(tiny, *good, required=False) -> Opt:
    return Opt(*good, bad=st.sampled_from(["", "missing-folder", "bert-bse", tiny["text.txt"], tiny["teacher"],
                                           tiny["student"]]), required=required)


def data(tiny, *good, required=True) -> Opt:
    return Opt(*good, bad=st.sampled_from([tiny["reviews.csv"], tiny["one-class.csv"], tiny["text.txt"],
                                           tiny["long.txt"], "missing.csv", "", "owner/not-on-the-hub:config"]),
               required=required)


TASK = Opt("seq-cls", bad=st.sampled_from(["masked-lm", "causal-lm", "token-cls", "image-cls", "embedding", "",
                                           "x"]), required=True)
COLUMN = Opt("text", "label", bad=st.sampled_from(["review", "positive", "nope", ""]))
PLAN = dict(heads=Opt(2, 4, "4,4"), depth=Opt(1, 2, 3), inner_heads=Opt(bad=INTS), keep=Opt("0,2", "0,1,2"),
            select=Opt("uniform", "first", "last", "importance"), keep_head_dim=FLAG, mlp=Opt(32, 64),
            init=Opt("transfer", "random"), head_split=Opt("aware", "contiguous"), allow_fewer_heads=FLAG,
            force=FLAG, trust_remote_code=FLAG, json=FLAG)
TRAINING = dict(steps=Opt(1, bad=BAD_COUNT, required=True), epochs=Opt(1, 0.5, 1e300), batch_size=Opt(8, 10**20),
                lr=Opt(1e-3, 1e300), grad_accum=Opt(1, 2, 10**20), eval_every=Opt(1, 10**20),
                patience=Opt(1, 10**20), max_length=Opt(8, 16), seed=Opt(0, 7, 2**32 - 1),
                mixed_precision=Opt("auto", "no", "bf16", "fp16"), save_every=Opt(1, 10**20), resume=FLAG,
                overwrite=FLAG, keep_checkpoints=FLAG, log_kappa=FLAG, quiet=FLAG, json=FLAG,
                push_to_hub=Opt(bad=st.sampled_from(["me/leaner", "not a repo", "", "a/b/c"])))


# --- one property per command ----------------------------------------------------------------------

@fuzz(40)
@given(st.data())
def test_inspect(tiny, drawn):
    source = model(tiny, tiny["teacher"], tiny["student"], "bert-base", "gpt2")
    check(["inspect", *draw_args(drawn, [source], PLAN)])


@fuzz(20)
@given(st.data())
def test_convert(tiny, drawn):
    out = fresh_out(tiny)
    args = draw_args(drawn, [model(tiny, tiny["teacher"])], {
        **PLAN, "seed": Opt(0, 3), "calib": Opt(tiny["text.txt"], tiny["long.txt"], bad=st.sampled_from(["no.txt", ""])),
        "overwrite": FLAG, "quiet": FLAG, "push_to_hub": TRAINING["push_to_hub"]})
    check(["convert", args[0], "-o", str(out), *args[1:]], out)
    shutil.rmtree(out.parent)


@fuzz(15)
@given(st.data())
def test_finetune(tiny, drawn):
    out = fresh_out(tiny)
    args = draw_args(drawn, [model(tiny, tiny["student"])], {
        "task": TASK, "data": data(tiny, tiny["labelled.csv"]), "text_column": COLUMN, "label_column": COLUMN,
        "image_column": COLUMN, "lora": Opt(2, 10**20), "validation_ratio": Opt(0.1, 0.3), **TRAINING})
    check(["finetune", args[0], "-o", str(out), *args[1:]], out)
    shutil.rmtree(out.parent)


@fuzz(10)
@given(st.data())
def test_distill(tiny, drawn):
    out = fresh_out(tiny)
    weight = Opt(0, 1, 0.5)
    args = draw_args(drawn, [], {
        "teacher": model(tiny, tiny["teacher"], required=True),
        "student": model(tiny, tiny["student"], required=True),
        "data": data(tiny, tiny["text.txt"], tiny["long.txt"]),
        "task": Opt(bad=st.sampled_from(["seq-cls", "token-cls", "x"])),
        "text_column": COLUMN, "label_column": COLUMN, "kl": weight, "hidden": weight, "pooled": weight,
        "task_weight": weight, "relation": weight, "relation_heads": Opt(1, 2, 4), "temperature": Opt(2, 0.5),
        "hidden_kind": Opt("mse", "cosine"), "layer_map": Opt("0,2", "0,1"), **TRAINING})
    check(["distill", "-o", str(out), *args], out)
    shutil.rmtree(out.parent)


@fuzz(15)
@given(st.data())
def test_eval(tiny, drawn):
    check(["eval", *draw_args(drawn, [model(tiny, tiny["student"])], {
        "task": Opt("seq-cls", "masked-lm", bad=TASK.bad, required=True), "data": data(tiny, tiny["labelled.csv"]),
        "text_column": COLUMN, "label_column": COLUMN, "image_column": COLUMN,
        "teacher": model(tiny, tiny["teacher"]), "max_length": Opt(8, 16), "seed": Opt(0, 7), "json": FLAG,
        "split": Opt("train", "validation", "test")})])


@fuzz(8)
@given(st.data())
def test_report(tiny, drawn):
    out = fresh_out(tiny)
    args = draw_args(drawn, [model(tiny, tiny["teacher"]), model(tiny, tiny["student"])], {
        "data": data(tiny, tiny["text.txt"], tiny["long.txt"]),
        "task": Opt("masked-lm", bad=TASK.bad, required=True),
        "batch_sizes": Opt("1", bad=LISTS.filter(small_list)),
        "seq_len": Opt(4, 8, bad=INTS.filter(lambda v: not 1 <= int(v) <= 16), required=True),
        "repeats": Opt(1, bad=BAD_COUNT, required=True), "no_kappa": FLAG, "overwrite": FLAG, "quiet": FLAG,
        "json": FLAG}, least_bad=1)  # a report that runs takes 10-20 s here (most of it measuring memory): few do
    check(["report", *args, "-o", str(out)], out)
    shutil.rmtree(out.parent)


@fuzz(8)
@given(st.data())
def test_sweep(tiny, drawn):
    out = fresh_out(tiny)
    args = draw_args(drawn, [model(tiny, tiny["teacher"])], {
        "heads": Opt("4", bad=LISTS.filter(small_list), required=True),
        "depth": Opt("1", bad=LISTS.filter(small_list), required=True), "data": data(tiny, tiny["labelled.csv"]),
        "task": TASK, "budget": Opt(1, bad=BAD_COUNT, required=True), "seeds": Opt(1, bad=BAD_COUNT),
        "init": Opt("transfer", "random"), "distill_data": Opt(tiny["text.txt"], bad=st.sampled_from(["no.txt"])),
        "breaks_below": Opt(0.98), "batch_size": Opt(16), "lr": Opt(1e-3), "max_length": Opt(8), "quiet": FLAG,
        "json": FLAG}, least_bad=1)  # a sweep that runs takes 10-20 s: a few do
    check(["sweep", args[0], "-o", str(out), *args[1:]], out)
    shutil.rmtree(out.parent)


@fuzz(15)
@given(st.data())
def test_push(tiny, drawn):
    folder = Opt(tiny["student"], bad=st.sampled_from([tiny["teacher"], str(tiny["root"]), "missing", ""]))
    check(["push", *draw_args(drawn, [folder], {
        "repo": Opt("me/leaner", bad=st.sampled_from(["bad id", "a/b/c", "me/x.git", "me/" + "x" * 100, ""]),
                    required=True),
        "private": FLAG, "revision": Opt("main", "dev", bad=st.sampled_from(["", "../x", " "])),
        "commit_message": Opt("a message", bad=st.sampled_from(["", " "])), "dry_run": FLAG, "json": FLAG})])
