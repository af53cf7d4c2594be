"""`reshape distill`: train a reshaped student to match its source model (the teacher) on unlabelled text.

Each student layer learns the output of the teacher layer it was copied from (reshape.json's kept
indices), so any depth ratio and any head counts work; the student's logits, when it has a head,
learn the teacher's softened distribution.
"""

from __future__ import annotations

import json
import math
import shutil
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import torch

from ..conditioning import with_kappa
from ..errors import ReshapeError, fail
from ..output import copy_extra_files, output_problems
from ..source import load_model, open_source
from .data import load_data, text_lengths
from .losses import (DistillWeights, attention_relation_loss, capture_qkv, combine, hidden_loss, layer_map, logit_kl,
                     pooled_cosine)
from .loop import TrainConfig, is_main_process, train
from .tasks import TASKS, collator

EVAL_ROWS = 256  # held-out rows scored at each evaluation: enough for a stable mean loss


def distill(teacher: str | Path, student: str | Path, out: str | Path, *, data: str | Path,
            config: TrainConfig = TrainConfig(),
            weights: DistillWeights = DistillWeights(), temperature: float = 2.0, hidden_kind: str = "mse",
            explicit_map: list[int] | None = None, relation_heads: int | None = None,
            text_column: str | None = None, max_length: int = 128,
            resume: bool = False, overwrite: bool = False, keep_checkpoints: bool = False,
            log_kappa: bool = False, progress: bool = False) -> dict:
    """Distil `student` (a reshape output folder) from `teacher`; write the student to `out`.

    With weights.relation > 0, each student layer also matches its teacher layer's Q-Q, K-K and V-V
    relations (MiniLMv2) over `relation_heads` chunks: by default the most, up to the teacher's head
    count, that divide every Q/K/V width of both models."""
    from transformers import AutoTokenizer

    teacher, data, out, student = str(teacher), str(data), Path(out), Path(student)  # reshape.json holds text
    problems = [] if resume else output_problems(out, overwrite)
    if problems:
        raise ReshapeError(problems)
    teacher_source, student_source = open_source(teacher), open_source(str(student))
    t_family, s_family = teacher_source.spec.family, student_source.spec.family
    if t_family is not s_family:
        raise fail("student", student, f"is a {s_family.name} model but the teacher is {t_family.name}",
                   "distil a student converted from this teacher")
    t_vocab = getattr(teacher_source.spec.config, "vocab_size", None)
    s_vocab = getattr(student_source.spec.config, "vocab_size", None)
    if t_vocab != s_vocab:
        raise fail("student", student, f"has a vocabulary of {s_vocab} tokens but the teacher has {t_vocab}",
                   "distil a student converted from this teacher")
    recipe_file = student / "reshape.json"
    recipe = json.loads(recipe_file.read_text()) if recipe_file.is_file() else None
    t_shape, s_shape = (f.shape(src.spec.config) for f, src in ((t_family, teacher_source),
                                                                (s_family, student_source)))
    mapping = layer_map(recipe, t_shape.layers, s_shape.layers, explicit_map)
    if overwrite and not resume:
        shutil.rmtree(out, ignore_errors=True)

    language_model = "CausalLM" in student_source.spec.cls.__name__
    dataset = load_data(data, task="causal-lm" if language_model else "embedding", text_column=text_column,
                        seed=config.seed)
    teacher_model = load_model(teacher_source).requires_grad_(False)
    student_model = load_model(student_source).train()
    tokenizer = AutoTokenizer.from_pretrained(student)
    collate = _text_only(collator(tokenizer, TASKS["causal-lm"], max_length))

    if weights.relation:
        relation_heads = relation_heads or _relation_heads(t_shape, s_shape)

    def loss_fn(model, batch):
        teacher_model.to(batch["input_ids"].device)
        with ExitStack() as hooks:
            if weights.relation:  # DDP wraps the student: hook the module inside
                t_qkv = hooks.enter_context(capture_qkv(teacher_model, t_family, sorted(set(mapping))))
                s_qkv = hooks.enter_context(capture_qkv(getattr(model, "module", model), s_family,
                                                        range(len(mapping))))
            with torch.no_grad():
                t = teacher_model(**batch, output_hidden_states=True)
            s = model(**batch, output_hidden_states=True)
        mask = batch["attention_mask"]
        terms = {"hidden": hidden_loss(s.hidden_states, t.hidden_states, mapping, kind=hidden_kind, mask=mask)}
        if weights.relation:
            terms["relation"] = torch.stack([attention_relation_loss(s_qkv[i], t_qkv[j], relation_heads, mask)
                                             for i, j in enumerate(mapping)]).mean()
        if getattr(s, "logits", None) is not None and weights.kl:
            terms["kl"] = logit_kl(s.logits, t.logits, temperature, mask=mask)
        if weights.pooled:
            terms["pooled"] = pooled_cosine(s.hidden_states[-1], t.hidden_states[-1], mask)
        return combine(terms, weights)

    held_out = dataset["test"].select(range(min(EVAL_ROWS, len(dataset["test"]))))

    def eval_fn(model):
        losses = [loss_fn(model, {k: v.to(next(model.parameters()).device) for k, v in
                                  collate([held_out[j] for j in range(i, min(i + 32, len(held_out)))]).items()})[0]
                  for i in range(0, len(held_out), 32)]
        loss = float(torch.stack(losses).mean())
        return {"distill_loss": loss, "score": -loss}

    run = {"teacher": teacher, "student": str(student), "data": data, "weights": asdict(weights),
           "relation_heads": relation_heads,
           "temperature": temperature, "hidden_kind": hidden_kind, "map": mapping, "max_length": max_length}
    summary = train(student_model, loss_fn, dataset["train"], collate, out, config,
                    eval_fn=with_kappa(eval_fn, held_out, collate, log_kappa),
                    resume=resume, run=run, lengths=text_lengths(dataset["train"]), progress=progress)
    result = {"teacher": teacher, "data": data, "layer_map": mapping, "weights": asdict(weights),
              "temperature": temperature, "config": asdict(config), **summary}
    if is_main_process():
        student_model.save_pretrained(out)
        copy_extra_files(student, out)
        (out / "reshape.json").write_text(json.dumps({**(recipe or {}), "distillation": result}, indent=2) + "\n")
        if not keep_checkpoints:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return result


def _relation_heads(teacher, student) -> int:
    widths = [w for shape in (teacher, student) for w in shape.role_widths.values()]
    common = math.gcd(*widths)
    return max(d for d in range(1, teacher.heads + 1) if common % d == 0)


def _text_only(collate):
    """Distillation needs no labels: drop the ones the language-model collator adds."""
    def wrapped(rows):
        batch = collate(rows)
        batch.pop("labels", None)
        return batch
    return wrapped
