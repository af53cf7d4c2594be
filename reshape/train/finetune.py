"""`reshape finetune` and `reshape eval`: train a model on a task, and score it on held-out data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import ReshapeError, fail
from ..output import output_problems
from .data import load_data, text_lengths
from .loop import TrainConfig, train
from .tasks import collator, get_task, load_model, score


def finetune(model: str | Path, out: str | Path, *, task: str, data: str, config: TrainConfig = TrainConfig(),
             text_column: str | None = None, label_column: str | None = None, max_length: int = 128,
             lora: int | None = None, resume: bool = False, overwrite: bool = False, keep_checkpoints: bool = False,
             progress: bool = False) -> dict:
    """Fine-tune `model` (a folder or Hub id) on `data`; write the best model to `out` and return its metrics."""
    from transformers import AutoTokenizer

    out = Path(out)
    if not resume:
        problems = output_problems(out, overwrite)
        if problems:
            raise ReshapeError(problems)
        if overwrite:
            shutil.rmtree(out, ignore_errors=True)
    spec = get_task(task)
    dataset = load_data(data, task=task, text_column=text_column, label_column=label_column, seed=config.seed)
    labels = dataset["train"].features["label"].names if spec.labelled else None
    tokenizer = AutoTokenizer.from_pretrained(model)
    net = load_model(model, spec, labels)
    if lora:
        net = _with_lora(net, lora, spec)
    collate = collator(tokenizer, spec, max_length)
    test = dataset["test"]
    run = {"model": str(model), "task": task, "data": data, "max_length": max_length, "lora": lora}
    summary = train(net, lambda m, batch: (m(**batch).loss, {}), dataset["train"], collate, out, config,
                    eval_fn=lambda m: score(m, test, collate, spec), resume=resume, run=run,
                    lengths=text_lengths(dataset["train"]), progress=progress)
    if lora:
        net = net.merge_and_unload()  # plain weights again: OUT loads without peft
    net.save_pretrained(out)
    tokenizer.save_pretrained(out)
    result = {"task": task, "data": data, "train_examples": len(dataset["train"]),
              "test_examples": len(test), **summary}
    (out / "finetune.json").write_text(json.dumps(result, indent=2) + "\n")
    if not keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return result


def evaluate(model: str | Path, *, task: str, data: str, text_column: str | None = None,
             label_column: str | None = None, max_length: int = 128, seed: int = 0) -> dict:
    """Score `model` on the test split of `data`: accuracy and F1, or perplexity."""
    from transformers import AutoTokenizer

    spec = get_task(task)
    dataset = load_data(data, task=task, text_column=text_column, label_column=label_column, seed=seed)
    net = load_model(model, spec)
    if spec.labelled and net.config.num_labels != dataset["test"].features["label"].num_classes:
        raise fail("task", task, f"needs {dataset['test'].features['label'].num_classes} labels but the model "
                   f"has {net.config.num_labels}", "fine-tune it on this data first (reshape finetune)")
    tokenizer = AutoTokenizer.from_pretrained(model)
    return score(net, dataset["test"], collator(tokenizer, spec, max_length), spec)


def _with_lora(model, rank: int, task):
    """Low-rank adapters on every linear layer of the blocks; the task head trains in full."""
    from peft import LoraConfig, get_peft_model

    peft_task = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}.get(task.name)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type=peft_task)
    return get_peft_model(model, config)
