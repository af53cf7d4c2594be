"""Bad values are refused before any work starts: one line naming the field, the value and the fix, exit
code 2 from the CLI, the same refusal from the Python API, and nothing written (issue 15, item 1)."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import torch
import transformers as tf

from helpers.cli_in_process import POSITIONS, WORDS, invoke, left_behind, tiny_project

import reshape
from reshape.errors import ReshapeError
from reshape.train.distill import distill
from reshape.train.finetune import evaluate, finetune
from reshape.train.losses import DistillWeights
from reshape.train.loop import TrainConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_project(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def out(tmp_path):
    """OUT inside a parent of its own, so anything a refused run leaves beside it shows."""
    (tmp_path / "outputs").mkdir()
    return tmp_path / "outputs" / "out"


def refused(run, *starts: str) -> None:
    """Exit code 2, no traceback, and one error line per expected start, in order."""
    assert run.code == 2, f"exit {run.code}: {run.exception!r}\n{run.output}"
    assert "Traceback" not in run.output, run.output
    assert len(run.errors) == len(starts), run.output
    for line, start in zip(run.errors, starts):
        assert line.startswith(f"error: {start}"), line
        assert "; " in line, f"no fix after the reason: {line}"


def message(call) -> str:
    with pytest.raises(ReshapeError) as e:
        call()
    return str(e.value)


# --- numbers: one range per option, for the CLI and the API alike --------------------------------

@pytest.mark.parametrize("kwargs, start", [
    (dict(max_steps=0), "max_steps=0: must be at least 1; pass --steps 1 or more"),
    (dict(epochs=0), "epochs=0: must be more than 0"),
    (dict(epochs=math.inf), "epochs=inf: must be a finite number"),
    (dict(batch_size=0), "batch_size=0: must be at least 1"),
    (dict(batch_size=2.5), "batch_size=2.5: must be a whole number"),
    # found by the fuzzer: torch's samplers and loss scaling take 64-bit counts (ValueError, OverflowError)
    (dict(batch_size=10**20), "batch_size=100000000000000000000: must be at most 9223372036854775807"),
    (dict(grad_accum=10**20), "grad_accum=100000000000000000000: must be at most 9223372036854775807"),
    (dict(lr=-1), "lr=-1: must be more than 0"),
    (dict(lr=math.nan), "lr=nan: must be a finite number"),
    (dict(grad_accum=0), "grad_accum=0: must be at least 1"),
    (dict(eval_every=0), "eval_every=0: must be at least 1"),
    (dict(patience=-1), "patience=-1: must be at least 1"),
    (dict(seed=-1), "seed=-1: must be at least 0"),
    (dict(seed=2**32), "seed=4294967296: must be at most 4294967295"),
    (dict(warmup_ratio=1.5), "warmup_ratio=1.5: must be at most 1"),
    (dict(mixed_precision="fp32"), "mixed_precision=fp32: is not a precision; use one of auto, no, fp16, bf16"),
])
def test_train_config_refuses_out_of_range_numbers(kwargs, start):
    assert message(lambda: TrainConfig(**kwargs)).startswith(start)


def test_every_problem_of_a_train_config_is_named_at_once():
    assert message(lambda: TrainConfig(batch_size=0, lr=-1, grad_accum=0)).splitlines() == [
        "batch_size=0: must be at least 1; use e.g. --batch-size 32",
        "lr=-1: must be more than 0; use e.g. --lr 5e-5",
        "grad_accum=0: must be at least 1; use 1 to take an optimizer step after every batch"]


FINETUNE_REFUSALS = [
    pytest.param(["--steps", 0], "max_steps=0: must be at least 1", id="steps-0"),  # was: a full epoch
    pytest.param(["--batch-size", 0], "batch_size=0: must be at least 1", id="batch-size-0"),
    pytest.param(["--lr", -1], "lr=-1.0: must be more than 0", id="lr-negative"),
    pytest.param(["--grad-accum", 0], "grad_accum=0: must be at least 1", id="grad-accum-0"),  # was: ZeroDivisionError
    pytest.param(["--eval-every", 0], "eval_every=0: must be at least 1", id="eval-every-0"),
    pytest.param(["--patience", 0], "patience=0: must be at least 1", id="patience-0"),
    pytest.param(["--epochs", "nan"], "epochs=nan: must be a finite number", id="epochs-nan"),
    pytest.param(["--seed", -1], "seed=-1: must be at least 0", id="seed-negative"),
    pytest.param(["--lora", -4], "lora=-4: must be at least 1", id="lora-negative"),  # was: peft's ValueError
    pytest.param(["--lora", 0], "lora=0: must be at least 1", id="lora-0"),  # was: silently no LoRA
    pytest.param(["--max-length", 0], "max_length=0: must be at least 1", id="max-length-0"),
    # was: a RuntimeError on a size mismatch once training had started, leaving an empty OUT
    pytest.param(["--max-length", 100000], f"max_length=100000: exceeds the {POSITIONS} positions",
                 id="max-length-above-positions"),
    pytest.param(["--mixed-precision", "fp32"], "mixed_precision=fp32: is not a precision", id="precision"),
    pytest.param(["--push-to-hub", "not a repo"], "repo=not a repo: is not a Hub repo id", id="push-to-hub-id"),
]


@pytest.mark.parametrize("args, start", FINETUNE_REFUSALS)
def test_finetune_refuses_bad_numbers_before_any_work(tiny, out, args, start):
    run = invoke("finetune", tiny["student"], "--task", "seq-cls", "--data", tiny["reviews.csv"],
                 "--label-column", "positive", "-o", out, "--steps", 1, *args)
    refused(run, start)
    assert left_behind(out) == []


def test_the_api_refuses_what_the_cli_refuses(tiny, out):
    ok = dict(task="seq-cls", data=str(tiny["reviews.csv"]), label_column="positive")
    assert message(lambda: finetune(tiny["student"], out, lora=0, **ok)).startswith("lora=0: must be at least 1")
    assert message(lambda: finetune(tiny["student"], out, max_length=10**5, **ok)).startswith(
        f"max_length=100000: exceeds the {POSITIONS} positions the model takes; use --max-length {POSITIONS} or less")
    assert message(lambda: evaluate(tiny["student"], max_length=10**5, **ok)).startswith("max_length=100000: exceeds")
    assert message(lambda: evaluate(tiny["student"], seed=-3, **ok)).startswith("seed=-3: must be at least 0")
    assert left_behind(out) == []


def test_the_default_max_length_fits_a_model_with_fewer_positions(tiny, out):
    """128 tokens by default, or the model's positions if it takes fewer: a 16-position model still trains."""
    result = finetune(tiny["student"], out, task="seq-cls", data=str(tiny["reviews.csv"]), label_column="positive",
                      config=TrainConfig(max_steps=1, batch_size=8))
    assert result["steps"] == 1


@pytest.mark.parametrize("args, start", [
    pytest.param(["--temperature", 0], "temperature=0.0: must be more than 0", id="temperature-0"),
    pytest.param(["--kl", -1], "weights.kl=-1.0: must be a finite number >= 0", id="kl-negative"),
    pytest.param(["--kl", 0, "--hidden", 0, "--task-weight", 0], "weights=kl=0,hidden=0,relation=0,pooled=0,task=0: "
                 "every loss term that applies", id="all-weights-0"),
    # the task term needs labels: without --task nothing would train (was: refused at the first step, after OUT)
    pytest.param(["--kl", 0, "--hidden", 0], "weights=kl=0,hidden=0,relation=0,pooled=0,task=1: every loss term "
                 "that applies (hidden, kl, pooled, relation) has weight 0", id="only-the-task-weight"),
    pytest.param(["--relation", 1, "--relation-heads", 0], "relation_heads=0: must be at least 1",
                 id="relation-heads-0"),
    pytest.param(["--relation", 1, "--relation-heads", 5], "relation_heads=5: does not divide every Q/K/V width",
                 id="relation-heads-not-dividing"),  # was: refused at the first step, after OUT was made
    pytest.param(["--hidden-kind", "l1"], "hidden_kind=l1: is not a hidden-state distance", id="hidden-kind"),
    pytest.param(["--layer-map", "0,,2"], "layer_map=0,,2: has an empty item", id="layer-map-gap"),
    pytest.param(["--max-length", 100000], "max_length=100000: exceeds the 16 positions", id="max-length"),
])
def test_distill_refuses_bad_values_before_any_work(tiny, out, args, start):
    run = invoke("distill", "--teacher", tiny["teacher"], "--student", tiny["student"], "--data", tiny["text.txt"],
                 "-o", out, "--steps", 1, *args)
    refused(run, start)
    assert left_behind(out) == []


def test_loss_weights_that_train_nothing_are_refused_by_the_api():
    assert message(lambda: DistillWeights(kl=0, hidden=0, task=0)).startswith(
        "weights=kl=0,hidden=0,relation=0,pooled=0,task=0: every loss term that applies")
    DistillWeights(kl=0, hidden=0, relation=1)  # one positive term is enough


@pytest.mark.parametrize("args, start", [
    pytest.param(["--batch-sizes", "1,,32"], "batch_sizes=1,,32: has an empty item", id="batch-sizes-gap"),
    pytest.param(["--batch-sizes", ""], "batch_sizes=: is empty", id="batch-sizes-empty"),  # was: IndexError
    pytest.param(["--batch-sizes", "0"], "batch_sizes=0: must be at least 1", id="batch-sizes-0"),
    pytest.param(["--repeats", 0], "repeats=0: must be at least 1", id="repeats-0"),
    pytest.param(["--seq-len", -1], "seq_len=-1: must be at least 1", id="seq-len-negative"),
])
def test_report_refuses_bad_numbers(tiny, out, args, start):
    refused(invoke("report", tiny["teacher"], tiny["student"], "-o", out, *args), start)
    assert left_behind(out) == []


@pytest.mark.parametrize("args, start", [
    pytest.param(["--budget", 0], "budget=0: must be at least 1", id="budget-0"),
    pytest.param(["--seeds", 0], "seeds=0: must be at least 1", id="seeds-0"),
    pytest.param(["--lr", 0], "lr=0.0: must be more than 0", id="lr-0"),  # was: checked after OUT was made
    pytest.param(["--breaks-below", 2], "breaks_below=2.0: must be at most 1", id="breaks-below"),
    pytest.param(["--depth", "1,,"], "depth=1,,: has an empty item", id="depth-gap"),  # was: read as 1
    pytest.param(["--max-length", 500], "max_length=500: exceeds the 16 positions", id="max-length"),
    pytest.param(["--init", "zeros"], "init=zeros: is not an initialisation", id="init"),  # was: after OUT
    pytest.param(["--data", "missing.csv"], "data=missing.csv: is not a file", id="data"),  # was: after OUT
])
def test_sweep_refuses_bad_values_before_making_out(tiny, out, args, start):
    run = invoke("sweep", tiny["teacher"], "--heads", 4, "--depth", 1, "--data", tiny["reviews.csv"], "--task",
                 "seq-cls", "-o", out, "--budget", 1, *args)
    refused(run, start)
    assert left_behind(out) == []


@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_a_list_with_an_empty_item_is_refused_not_shortened(tiny, out, command):
    run = invoke(command, tiny["teacher"], "--depth", "2,,", *(["-o", out] if command == "convert" else []))
    refused(run, "depth=2,,: has an empty item; write e.g. --depth 0,2,4")  # was: depth=2


def test_a_seed_too_large_for_torch_is_refused(tiny, out):
    refused(invoke("convert", tiny["teacher"], "-o", out, "--init", "random", "--seed", 10**20),
            "seed=100000000000000000000: must be at most 4294967295")  # was: torch's overflow RuntimeError
    assert left_behind(out) == []


def test_push_to_hub_without_a_token_is_refused_before_converting(tiny, out, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    refused(invoke("convert", tiny["teacher"], "-o", out, "--heads", 4, "--depth", 2, "--push-to-hub", "me/leaner"),
            "token=None: no Hugging Face token found")  # was: refused after the conversion was written
    assert left_behind(out) == []


# --- configs: a broken source is named as such ---------------------------------------------------

def broken_copy(tiny, tmp_path, **config) -> str:
    folder = shutil.copytree(tiny["teacher"], tmp_path / "broken")
    values = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**values, **config}))
    return str(folder)


@pytest.mark.parametrize("config, start", [
    # was: ZeroDivisionError in families/hf.py (convert) and in transformers (inspect)
    ({"num_attention_heads": 0}, "config.json num_attention_heads=0: must be a whole number of at least 1, so the "
                                 "source model is broken (not the plan); fix the source's config.json"),
    # was: "depth=-1: must be between 1 and the model's -1 layers", blaming the user's --depth
    ({"num_hidden_layers": -1}, "config.json num_hidden_layers=-1: must be a whole number of at least 1"),
    ({"num_attention_heads": 3}, "config.json num_attention_heads=3: does not divide hidden_size 32"),
])
@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_a_broken_source_config_is_blamed_on_the_source(tiny, tmp_path, out, config, start, command):
    source = broken_copy(tiny, tmp_path, **config)
    refused(invoke(command, source, "--depth", 2, *(["-o", out] if command == "convert" else [])), start)
    assert left_behind(out) == []


def test_finetune_of_a_broken_source_config_is_blamed_on_the_source(tiny, tmp_path, out):
    source = broken_copy(tiny, tmp_path, num_attention_heads=0)
    refused(invoke("finetune", source, "--task", "seq-cls", "--data", tiny["reviews.csv"], "--label-column",
                   "positive", "-o", out, "--steps", 1), "config.json num_attention_heads=0")
    assert left_behind(out) == []


def test_a_broken_timm_config_is_blamed_on_the_source(tmp_path):
    folder = tmp_path / "vit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": 5,
                                                    "model_args": {"num_heads": 0, "img_size": 16}}))
    assert message(lambda: reshape.inspect(str(folder))).startswith(
        'config.json model_args={"img_size": 16, "num_classes": 5, "num_heads": 0}: timm cannot build '
        "vit_tiny_patch16_224 from them (ZeroDivisionError")


def test_inspect_reads_the_config_only(tiny, tmp_path, monkeypatch):
    """No weights are read. A known family's config is counted from its numbers, with nothing built
    (reshape/config_shape.py); the meta-model path keeps every parameter on the meta device."""
    from reshape.families.hf import HFFamily
    from reshape.pipeline import inspect_meta

    folder = shutil.copytree(tiny["teacher"], tmp_path / "no-weights")
    (folder / "model.safetensors").unlink()
    built, build = [], HFFamily.build
    monkeypatch.setattr(HFFamily, "build", lambda *args, **kwargs: built.append(build(*args, **kwargs)) or built[-1])
    report = reshape.inspect(str(folder), heads=4, depth=2)
    assert report["result"]["shape"]["heads"] == 4 and built == []
    assert inspect_meta(str(folder), heads=4, depth=2) == report and len(built) == 2  # the source and the result
    assert all(p.is_meta for model in built for p in model.parameters())


# --- data ----------------------------------------------------------------------------------------

def test_one_class_training_data_is_refused(tiny, out):
    """One class trains to a meaningless accuracy of 1.0 (as it did): refused."""
    run = invoke("finetune", tiny["student"], "--task", "seq-cls", "--data", tiny["one-class.csv"],
                 "--label-column", "positive", "-o", out, "--steps", 1)
    refused(run, "label_column=positive: holds a single class ('1') in all 17 training rows, so there is nothing "
                 "to learn")
    assert left_behind(out) == []


def test_one_class_of_tags_is_refused(tmp_path):
    from reshape.train.data import load_data

    rows = [{"tokens": ["a", "b"], "ner_tags": ["O", "O"]}] * 10
    (tmp_path / "tags.json").write_text(json.dumps(rows))
    assert message(lambda: load_data(str(tmp_path / "tags.json"), task="token-cls")).startswith(
        "label_column=ner_tags: holds a single class ('O')")


def test_dropped_rows_are_counted_and_reported(tmp_path, caplog):
    """40 rows that silently became 13: now the warning says how many went and why."""
    from reshape.train.data import load_data

    texts = [f"review {i}" if i % 3 == 0 else ("" if i % 3 == 1 else "  ") for i in range(40)]
    labels = ["" if i in (0, 3) else str(i % 2) for i in range(40)]
    (tmp_path / "gaps.csv").write_text("text,label\n" + "\n".join(f"{t},{l}" for t, l in zip(texts, labels)) + "\n")
    with caplog.at_level(logging.WARNING, logger="reshape"):
        data = load_data(str(tmp_path / "gaps.csv"), task="seq-cls", test_ratio=0.25, validation_ratio=0.25)
    assert sum(len(part) for part in data.values()) == 12
    assert f"dropped 28 of the 40 rows of {tmp_path / 'gaps.csv'}: 26 with an empty or missing 'text'; 2 with a " \
           "missing, NaN or negative (unlabelled) 'label'" in caplog.text


def test_too_few_rows_of_a_class_for_the_split_is_refused_by_the_cli(tiny, tmp_path, out):
    rows = [f"the film was {w},{w}" for w in WORDS * 3] + ["the film was fine,rare"]
    (tmp_path / "rare.csv").write_text("review,mood\n" + "\n".join(rows) + "\n")
    refused(invoke("finetune", tiny["student"], "--task", "seq-cls", "--data", tmp_path / "rare.csv",
                   "--label-column", "mood", "-o", out, "--steps", 1),
            "test_ratio=0.2: cannot stratify: class 'rare' has 1 row")
    assert left_behind(out) == []


# --- wrong types in the Python API ---------------------------------------------------------------

@pytest.mark.parametrize("call, start", [
    (lambda: reshape.leaner("not a module"), "model='not a module': is of type str, not a torch nn.Module"),
    (lambda: reshape.convert(42, "out"), "source=42: is of type int, not a Hub id, alias, folder"),
    (lambda: reshape.convert("minilm", 42), "out=42: is of type int, not a folder path"),
    (lambda: reshape.load(42), "folder=42: is of type int, not a folder path"),
    (lambda: reshape.load(None), "folder=<NoneType>: is of type NoneType, not a folder path"),
    (lambda: reshape.inspect(3.5), "source=3.5: is of type float, not a Hub id, alias, folder or model"),
    # a model object, whose repr would fill the screen: report measures saved folders
    (lambda: reshape.report(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()), "leaner"),
     "base=<Sequential>: is of type Sequential, not a folder, alias or Hub id; save the model"),
])
def test_a_wrong_type_is_a_one_line_error(call, start):
    assert message(call).startswith(start)  # was: AttributeError or TypeError from deep inside


def test_a_plan_count_of_the_wrong_type_is_a_one_line_error():
    model = tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, vocab_size=50))
    assert message(lambda: reshape.leaner(model, heads="4")).startswith(
        "heads=4: is not a whole number or a list of whole numbers")
    assert message(lambda: reshape.leaner(model, heads=4, seed=-1)).startswith("seed=-1: must be at least 0")
    assert message(lambda: distill("a", "b", "out", data="x", temperature=-1)).startswith("temperature=-1")


# --- crashes the CLI fuzzer (tests/test_fuzz_cli.py) found ---------------------------------------

def test_a_lora_rank_above_the_full_rank_is_refused(tiny, out):
    """Was: torch's TypeError allocating a rank-10^20 adapter, after the data and model were loaded."""
    run = invoke("finetune", tiny["student"], "--task", "seq-cls", "--data", tiny["labelled.csv"], "-o", out,
                 "--steps", 1, "--lora", 1000)
    refused(run, "lora=1000: exceeds 32, the full rank of the model's widest layers; use at most 32")
    assert left_behind(out) == []


def test_one_column_cannot_be_both_the_text_and_the_label(tiny, out):
    """Was: datasets' ValueError "Column 'text' doesn't exist" from renaming one column twice."""
    refused(invoke("finetune", tiny["student"], "--task", "seq-cls", "--data", tiny["labelled.csv"],
                   "--label-column", "text", "-o", out, "--steps", 1),
            "label_column=text: is already the text column; name another label column, one of label")
    assert left_behind(out) == []


def test_log_kappa_measures_a_lora_model(tiny, out):
    """Was: AttributeError: --log-kappa looked for the block stack on peft's wrapper instead of the model in it."""
    result = finetune(tiny["student"], out, task="seq-cls", data=str(tiny["labelled.csv"]), lora=2, log_kappa=True,
                      config=TrainConfig(max_steps=1, batch_size=8))
    kappas = [json.loads(line)["validation"]["kappa"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "validation" in line]
    assert result["steps"] == 1 and len(kappas[0]) == 2  # one κ per layer of the 2-layer student


def test_calibration_text_longer_than_the_positions_is_truncated_to_them(tiny, out):
    """Was: a RuntimeError (52 tokens against 16 positions) while scoring layers, found while fuzzing with long
    rows: calibration text was cut at 128 tokens whatever the model takes."""
    run = invoke("convert", tiny["teacher"], "-o", out, "--heads", 4, "--depth", 2, "--calib", tiny["long.txt"],
                 "--select", "importance", "--json")
    assert run.code == 0, f"{run.exception!r}\n{run.output}"
    assert json.loads(run.output[run.output.index("{"):])["layer_scores"]["calib"] == str(tiny["long.txt"])
