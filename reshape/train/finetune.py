"""`reshape finetune` and `reshape eval`: train a model on a task, and score it on held-out data."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from .. import validate
from ..card import write_card
from ..conditioning import with_kappa
from ..errors import ReshapeError, fail
from ..inputs import max_length_for
from ..source import load_model as load_source_model
from ..source import local_model, open_source
from ..output import locks_out, output_problems, umask_modes
from .data import DEFAULT_VALIDATION_RATIO, SPLITS, label_names, load_data, text_lengths
from .losses import mean_pool
from .loop import TrainConfig, full_state_dict, is_main_process, start, train
from .tasks import collator, get_task, load_task_model, preprocessor, score


@locks_out  # the whole run, checks to final save: a second writer to OUT is refused
def finetune(model: str | Path, out: str | Path, *, task: str, data: str, config: TrainConfig = TrainConfig(),
             text_column: str | None = None, label_column: str | None = None, image_column: str | None = None,
             max_length: int | None = None, lora: int | None = None,
             validation_ratio: float = DEFAULT_VALIDATION_RATIO,
             resume: bool = False, overwrite: bool = False,
             keep_checkpoints: bool = False, log_kappa: bool = False, progress: bool = False) -> dict:
    """Fine-tune `model` (a folder, preset alias or Hub id) on `data`; write the best model to `out` and return its metrics.
    `max_length`: tokens per example, within the model's positions (default 128, or fewer if it takes fewer)."""
    validate.check(max_length=max_length, lora=lora)
    out = Path(out)
    if not resume:
        problems = output_problems(out, overwrite)
        if problems:
            raise ReshapeError(problems)
    spec = get_task(task)
    dataset = load_data(data, task=task, text_column=text_column, label_column=label_column,
                        image_column=image_column, validation_ratio=validation_ratio)
    labels = label_names(dataset["train"]) if spec.labelled else None
    folder, _ = local_model(model)
    processor = preprocessor(folder, spec)
    torch.manual_seed(config.seed)  # a new task head is drawn here: it must not depend on earlier work
    net = load_task_model(folder, spec, labels)
    max_length = max_length_for(max_length, net)
    if lora:
        net = _with_lora(net, lora, spec)
    collate = collator(processor, spec, max_length)
    validation, test = dataset["validation"], dataset["test"]
    run = {"model": str(model), "task": task, "data": data, "max_length": max_length, "lora": lora,
           "validation_ratio": validation_ratio}
    start(config)  # a launch accelerate would not honour is refused here, before OUT changes
    if overwrite and not resume:  # only now: a refused request must leave the old OUT as it was
        shutil.rmtree(out, ignore_errors=True)
    summary = train(net, lambda m, batch: (m(**batch).loss, {}), dataset["train"], collate, out, config,
                    eval_fn=with_kappa(lambda m: score(m, validation, collate, spec), validation, collate, log_kappa),
                    test_fn=lambda m: score(m, test, collate, spec), resume=resume, run=run,
                    lengths=text_lengths(dataset["train"]), progress=progress)
    if lora:
        net = net.merge_and_unload()  # plain weights again: OUT loads without peft
    result = {"task": task, "data": data, "model": str(model), "lora": lora, "config": asdict(config),
              "train_examples": len(dataset["train"]), "validation_examples": len(validation),
              "test_examples": len(test), **summary}
    weights = full_state_dict(net)  # every process: under FSDP2 it gathers the shards
    if is_main_process():
        net.save_pretrained(out, **({} if weights is None else {"state_dict": weights}))
        processor.save_pretrained(out)
        (out / "finetune.json").write_text(json.dumps(result, indent=2) + "\n")
        write_card(out, model)
        umask_modes(out)  # safetensors writes 0600
        if not keep_checkpoints:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return result


def evaluate(model: str | Path, *, task: str, data: str, text_column: str | None = None,
             label_column: str | None = None, image_column: str | None = None, teacher: str | None = None,
             max_length: int | None = None, seed: int = 0, split: str = "test") -> dict:
    """Score `model` on a split of `data` (test by default): accuracy and F1, perplexity, or (task
    "embedding") the mean cosine between its mean-pooled sentence embeddings and `teacher`'s."""
    validate.check(max_length=max_length, seed=seed)
    if split not in SPLITS:
        raise fail("split", split, "is not a split", f"use one of {', '.join(SPLITS)}")
    if task == "embedding":
        return _embedding_cosine(model, teacher, data, text_column, max_length, split)
    if teacher is not None:
        raise fail("teacher", teacher, f"is only used by --task embedding, not {task}", "leave --teacher out")
    spec = get_task(task)
    dataset = load_data(data, task=task, text_column=text_column, label_column=label_column,
                        image_column=image_column)
    folder, gguf_file = local_model(model, gguf=True)
    torch.manual_seed(seed)  # a model without the task's head gets a fresh one: make it the same every time
    net = load_task_model(folder, spec, gguf_file=gguf_file)
    max_length = max_length_for(max_length, net)
    classes = len(label_names(dataset[split])) if spec.labelled else None
    if spec.labelled and net.config.num_labels != classes:
        raise fail("task", task, f"needs {classes} labels but the model has {net.config.num_labels}",
                   "fine-tune it on this data first (reshape finetune)")
    return {**score(net, dataset[split], collator(preprocessor(folder, spec, gguf_file), spec, max_length), spec),
            "split": split}


@torch.no_grad()
def _embedding_cosine(model, teacher, data, text_column, max_length, split, batch_size: int = 64) -> dict:
    from transformers import AutoTokenizer

    if teacher is None:
        raise fail("teacher", None, "is needed by --task embedding to compare sentence embeddings with",
                   "pass --teacher, e.g. the model this one was converted from")
    texts = load_data(data, task="embedding", text_column=text_column)[split]["text"]
    folder, gguf_file = local_model(model, gguf=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    student, reference = (load_source_model(open_source(str(m))) for m in (model, teacher))
    max_length = max_length_for(max_length, student, reference)
    cosines = []
    for first in range(0, len(texts), batch_size):
        batch = dict(tokenizer(texts[first:first + batch_size], truncation=True, max_length=max_length,
                               padding=True, return_tensors="pt"))
        a, b = (mean_pool(m(**batch, output_hidden_states=True).hidden_states[-1], batch["attention_mask"])
                for m in (student, reference))
        cosines.append(torch.nn.functional.cosine_similarity(a, b, dim=-1))
    cosine = torch.cat(cosines)
    return {"cosine": cosine.mean().item(), "min_cosine": cosine.min().item(), "score": cosine.mean().item(),
            "examples": len(cosine), "split": split}


def _with_lora(model, rank: int, task):
    """Low-rank adapters on every linear layer of the blocks; the task head trains in full."""
    from peft import LoraConfig, get_peft_model

    # A rank above a layer's smaller side adds nothing a full update lacks (and a huge one cannot be allocated).
    full = max(min(m.weight.shape) for m in model.modules()
               if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
               and not isinstance(m, torch.nn.Embedding))
    if rank > full:
        raise fail("lora", rank, f"exceeds {full}, the full rank of the model's widest layers",
                   f"use at most {full}, or leave --lora out to train every weight")

    peft_task = {"seq-cls": "SEQ_CLS", "token-cls": "TOKEN_CLS", "causal-lm": "CAUSAL_LM"}.get(task.name)
    head = ["classifier"] if task.name == "image-cls" else None  # no peft task type trains an image head
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type=peft_task,
                        modules_to_save=head)
    return get_peft_model(model, config)
