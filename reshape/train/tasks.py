"""Tasks: which model class, how a batch is built, and how a model is scored.

One table drives fine-tuning, distillation and evaluation, so a task is defined in one place.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..confine import safetensors_weights
from ..errors import fail
from ..source import is_timm_folder
from .timm_task import TimmProcessor, load_classifier

log = logging.getLogger("reshape")


@dataclass(frozen=True)
class Task:
    name: str
    auto_class: str  # the transformers Auto class that adds this task's head
    labelled: bool  # batches carry class labels (per example, or per word for token-cls)
    metric: str  # the "score" that picks the best checkpoint (higher is better)
    inputs: str = "text"  # "text", "tokens" (pre-split words) or "image"


TASKS = {
    "seq-cls": Task("seq-cls", "AutoModelForSequenceClassification", True, "accuracy"),
    "token-cls": Task("token-cls", "AutoModelForTokenClassification", True, "accuracy", inputs="tokens"),
    "masked-lm": Task("masked-lm", "AutoModelForMaskedLM", False, "neg_perplexity"),
    "causal-lm": Task("causal-lm", "AutoModelForCausalLM", False, "neg_perplexity"),
    "image-cls": Task("image-cls", "AutoModelForImageClassification", True, "accuracy", inputs="image"),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise fail("task", name, "is not a task reshape can train or evaluate yet",
                   f"use one of {', '.join(TASKS)}")
    return TASKS[name]


def load_task_model(path, task: Task, label_names: list[str] | None = None, trust_remote_code: bool = False,
               gguf_file: str | None = None) -> nn.Module:
    """The model at `path` (or its GGUF file) with `task`'s head (a fresh head when the checkpoint has none)."""
    import transformers

    if is_timm_folder(path):
        if task.name != "image-cls":
            raise fail("task", task.name, f"does not fit the timm image model at {path}", "use --task image-cls")
        return load_classifier(path, label_names if task.labelled else None)
    # Training keeps float32 master weights whatever the checkpoint stores: transformers v5 loads a
    # float16/bfloat16 folder in that dtype, and AdamW steps on half-precision weights underflow (a MiniLM
    # stored in float16 collapsed to the majority class on a GPU). Mixed precision (bf16 autocast on a GPU)
    # comes from accelerate; GGUF tensors are dequantised to float32 likewise.
    if gguf_file:
        kwargs = dict(gguf_file=gguf_file, dtype=torch.float32)
    else:  # safetensors inside the folder only: never fall back to pytorch_model.bin
        safetensors_weights(path, str(path))
        kwargs = dict(dtype=torch.float32, use_safetensors=True)
    if task.labelled and label_names:
        kwargs |= dict(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                       label2id={n: i for i, n in enumerate(label_names)})
    # transformers' LOAD REPORT (a table of weights on stderr) is said here in one line instead. Filtered
    # by its text: raising the logger's level instead makes from_pretrained warn about tensor parallelism.
    loader = transformers.logging.get_logger("transformers.modeling_utils")
    loader.addFilter(_without_load_report)
    try:
        model, info = getattr(transformers, task.auto_class).from_pretrained(
            path, trust_remote_code=trust_remote_code, output_loading_info=True, **kwargs)
    except ValueError as e:  # the Auto class has no mapping for this model type
        raise fail("task", task.name, f"does not fit the model at {path} ({str(e).splitlines()[0][:160]})",
                   "choose a task this model supports") from None
    finally:
        loader.removeFilter(_without_load_report)
    _report_loading(model, info, path, task)
    return model


def _without_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


def _report_loading(model: nn.Module, info: dict, path, task: Task) -> None:
    """What from_pretrained did not load, in one line each: a task head that starts from random weights (as
    expected when training begins from a model without one), and, as warnings, missing weights inside the
    base model or weights whose shapes differ. Checkpoint weights the class has no place for (another
    task's head, a pooler) are ignored, as transformers ignores them."""
    base = f"{model.base_model_prefix}."
    missing = sorted(info.get("missing_keys") or ())
    head = [k for k in missing if not k.startswith(base)]
    if head:
        labels = f", {model.config.num_labels} labels" if task.labelled else ""
        log.warning("reshape: %s has no %s head: a new one (%s%s) starts from random weights", path, task.name,
                    ", ".join(head), labels)
    if inside := [k for k in missing if k.startswith(base)]:
        log.warning("reshape: %s lacks %d weights of its model, which start from random values: %s", path,
                    len(inside), ", ".join(inside[:5]) + (", ..." if len(inside) > 5 else ""))
    if mismatched := sorted(info.get("mismatched_keys") or ()):
        log.warning("reshape: %s holds weights of other shapes, which start from random values: %s", path,
                    ", ".join(str(m[0] if isinstance(m, tuple) else m) for m in mismatched[:5]))


def preprocessor(path, task: Task, gguf_file: str | None = None):
    """The tokenizer, or for images the image processor, saved with the model at `path` (or in its GGUF file)."""
    import transformers

    if task.inputs == "image" and is_timm_folder(path):
        return TimmProcessor(path)
    auto = transformers.AutoImageProcessor if task.inputs == "image" else transformers.AutoTokenizer
    try:
        return auto.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError) as e:
        kind = "image processor" if task.inputs == "image" else "tokenizer"
        raise fail("model", path, f"has no {kind} for task {task.name} ({str(e).splitlines()[0][:120]})",
                   "use a folder written by reshape convert, or save the processor beside the model") from None


def collator(processor, task: Task, max_length: int) -> Callable[[list[dict]], dict]:
    """Turn a list of rows into a padded batch with the loss's labels: {"text", "label"?} rows are
    tokenised, {"tokens", "label"} rows tokenised as words with each word's tag on its first sub-token,
    {"image", "label"} rows run through the image processor as RGB."""
    if task.inputs == "image":
        return lambda rows: {**processor([r["image"].convert("RGB") for r in rows], return_tensors="pt"),
                             "labels": torch.tensor([r["label"] for r in rows])}
    tokenizer = processor
    if tokenizer.pad_token is None:  # decoders often ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    if task.inputs == "tokens":
        return lambda rows: _word_batch(tokenizer, rows, max_length)
    if task.name == "masked-lm":
        return _masked_batches(tokenizer, max_length)

    def collate(rows: list[dict]) -> dict:
        batch = dict(tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length, padding=True,
                               return_tensors="pt"))
        if task.labelled:
            batch["labels"] = torch.tensor([r["label"] for r in rows])
        elif task.name == "causal-lm":
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    return collate


def _masked_batches(tokenizer, max_length: int) -> Callable[[list[dict]], dict]:
    """BERT's masking, by transformers: 15% of the real tokens are scored, and of those 80% become the mask
    token, 10% a random token and 10% stay. No seed of its own: it draws from the global torch RNG, which
    the training loop seeds and its checkpoints save, so a resumed run masks as the uninterrupted one."""
    from transformers import DataCollatorForLanguageModeling

    masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)

    def collate(rows: list[dict]) -> dict:
        # special_tokens_mask (padded with 1s) keeps special tokens and padding unmasked
        encoded = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length,
                            return_special_tokens_mask=True)
        return dict(masker([dict(zip(encoded, values)) for values in zip(*encoded.values())]))

    return collate


def _word_batch(tokenizer, rows: list[dict], max_length: int) -> dict:
    encoded = tokenizer([r["tokens"] for r in rows], is_split_into_words=True, truncation=True,
                        max_length=max_length, padding=True, return_tensors="pt")
    labels = torch.full(encoded["input_ids"].shape, -100)
    for i, row in enumerate(rows):
        previous = None
        for position, word in enumerate(encoded.word_ids(i)):
            if word is not None and word != previous:  # a word's first sub-token carries its tag
                labels[i, position] = row["label"][word]
            previous = word
    return {**encoded, "labels": labels}


@torch.no_grad()
def score(model: nn.Module, rows, collate, task: Task, batch_size: int = 64) -> dict[str, float]:
    """Accuracy and macro F1 for classification; perplexity for language models."""
    model.eval()
    device = next(model.parameters()).device
    predictions, labels, loss_sum, tokens = [], [], 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in range(start, min(start + batch_size,
                                                                                       len(rows)))]).items()}
        out = model(**batch)
        if task.labelled:  # token-cls: only the tokens that carry a tag
            scored = batch["labels"] != -100
            predictions.append(out.logits.argmax(-1)[scored].cpu())
            labels.append(batch["labels"][scored].cpu())
        else:
            counted = int((batch["labels"] != -100).sum()) - (batch["labels"].shape[0] if task.name == "causal-lm"
                                                               else 0)
            loss_sum += out.loss.item() * counted
            tokens += counted
    if task.labelled:
        pred, gold = torch.cat(predictions), torch.cat(labels)
        return {"accuracy": (pred == gold).float().mean().item(), "f1": _macro_f1(pred, gold),
                "score": (pred == gold).float().mean().item(), "examples": len(gold)}
    perplexity = math.exp(loss_sum / max(tokens, 1))
    return {"perplexity": perplexity, "score": -perplexity, "tokens": tokens}


def _macro_f1(pred: torch.Tensor, gold: torch.Tensor) -> float:
    scores = []
    for c in torch.unique(torch.cat([pred, gold])):
        tp = ((pred == c) & (gold == c)).sum().item()
        fp = ((pred == c) & (gold != c)).sum().item()
        fn = ((pred != c) & (gold == c)).sum().item()
        scores.append(2 * tp / max(2 * tp + fp + fn, 1))
    return sum(scores) / len(scores)
