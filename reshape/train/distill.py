"""`reshape distill`: train a reshaped student to match its source model (the teacher).

Each student layer learns the output of the teacher layer it was copied from (reshape.json's kept
indices), so any depth ratio and any head counts work; the student's logits, when it has a head,
learn the teacher's softened distribution. On unlabelled text that is all; with a labelled task
(`task="seq-cls"` or `"token-cls"`) the teacher is a model fine-tuned on that task, the student
starts from the teacher's task head, and the cross entropy against the labels is added.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import torch

from .. import validate
from ..card import write_card
from ..conditioning import with_kappa
from ..confine import safetensors_weights
from ..errors import ReshapeError, fail
from ..inputs import max_length_for
from ..output import copy_extra_files, locks_out, output_problems, umask_modes
from ..source import load_model, open_source
from ..stages import refuse_stages
from . import teacher_cache as cache_files
from .data import label_names, load_data, text_lengths
from .losses import (DistillWeights, attention_relation_loss, capture_qkv, check_hidden_kind, check_relation_heads,
                     combine, hidden_loss, layer_map, logit_kl, pooled_cosine, topk_logit_kl)
from .loop import TrainConfig, full_state_dict, is_main_process, start, train
from .tasks import TASKS, Task, collator, get_task, load_task_model, score

EVAL_ROWS = 256  # held-out rows scored at each evaluation: enough for a stable mean loss


@locks_out  # the whole run, checks to final save: a second writer to OUT is refused
def distill(teacher: str | Path, student: str | Path, out: str | Path, *, data: str | Path,
            task: str | None = None, label_column: str | None = None, config: TrainConfig = TrainConfig(),
            weights: DistillWeights = DistillWeights(), temperature: float = 2.0, hidden_kind: str = "mse",
            explicit_map: list[int] | None = None, relation_heads: int | None = None,
            text_column: str | None = None, max_length: int | None = None,
            resume: bool = False, overwrite: bool = False, keep_checkpoints: bool = False,
            log_kappa: bool = False, progress: bool = False, teacher_cache: str | Path | None = None,
            cache_every_layer: bool = False) -> dict:
    """Distil `student` (a reshape output folder) from `teacher`; write the student to `out`.

    With weights.relation > 0, each student layer also matches its teacher layer's Q-Q, K-K and V-V
    relations (MiniLMv2) over `relation_heads` chunks: by default the most, up to the teacher's head
    count, that divide every Q/K/V width of both models.

    With `task` (seq-cls or token-cls), `data` must carry labels and `teacher` must already be fine-tuned
    on them; the best checkpoint is then the one with the best held-out task score.

    `max_length`: tokens per example, within both models' positions (default 128, or fewer if they take fewer).

    `teacher_cache`: a folder for the teacher's outputs (reshape.train.teacher_cache). Absent, the teacher
    runs once over the data, writes it, and is let go before training; present, the teacher is never
    loaded. `cache_every_layer` writes every teacher layer, for later runs that map other layers (a sweep)."""
    from transformers import AutoTokenizer

    validate.check(temperature=temperature, relation_heads=relation_heads, max_length=max_length)
    check_hidden_kind(hidden_kind)
    if teacher_cache is not None and weights.relation:
        raise fail("teacher_cache", teacher_cache, "cannot serve the attention-relation term, which needs the "
                   "teacher's Q, K and V at every mapped layer", "drop --teacher-cache, or set --relation 0")
    teacher, data, out, student = str(teacher), str(data), Path(out), Path(student)  # reshape.json holds text
    problems = [] if resume else output_problems(out, overwrite)
    if problems:
        raise ReshapeError(problems)
    teacher_source, student_source = open_source(teacher), open_source(str(student))
    t_family, s_family = teacher_source.spec.family, student_source.spec.family
    if t_family is not s_family:
        raise fail("student", student, f"is a {s_family.name} model but the teacher is {t_family.name}",
                   "distil a student converted from this teacher")
    refuse_stages(t_family, "teacher", teacher, "distill")
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

    tokenizer = AutoTokenizer.from_pretrained(student)
    cached = cache_files.exists(teacher_cache)  # then the teacher is never loaded
    teacher_model = labels = None
    if task is None:
        language_model = "CausalLM" in student_source.spec.cls.__name__
        dataset = load_data(data, task="causal-lm" if language_model else "embedding", text_column=text_column)
        # float32 whatever the folders store: AdamW on half-precision weights underflows (see tasks.load_task_model)
        if not cached:
            teacher_model = load_model(teacher_source).float()
        student_model = load_model(student_source).float()
    else:
        spec = _labelled_text_task(task)
        dataset = load_data(data, task=task, text_column=text_column, label_column=label_column)
        labels = label_names(dataset["train"])
        _check_task_teacher(teacher_source, spec, labels)
        if not cached:
            teacher_model = load_task_model(teacher_source.folder, spec)
        torch.manual_seed(config.seed)  # a head the teacher cannot give is drawn here, the same every run
        student_model = load_task_model(student, spec, labels)
        head = (_copy_task_head(teacher_model, student_model, spec) if teacher_model is not None
                else _head_from_files(teacher_source.folder, student_model, spec))
    # Without the teacher, its positions are read from a model on the meta device (no weights).
    teacher_positions = teacher_model if teacher_model is not None else t_family.build(teacher_source.spec, empty=True)
    max_length = max_length_for(max_length, teacher_positions, student_model)
    if task is None:
        collate = _text_only(collator(tokenizer, TASKS["causal-lm"], max_length))
    else:
        collate = collator(tokenizer, spec, max_length)
    # Terms that can train this student: the task term needs labels, the KL a student with logits.
    with_logits = getattr(student_model, "base_model", student_model) is not student_model
    weights.check_trains({"hidden", "pooled", "relation"} | ({"task"} if task else set())
                         | ({"kl"} if with_logits else set()))
    if teacher_model is not None:
        teacher_model.requires_grad_(False).eval()
    student_model.train()

    if weights.relation:
        relation_heads = relation_heads or _relation_heads(t_shape, s_shape)
        check_relation_heads(relation_heads, [w for shape in (t_shape, s_shape) for w in shape.role_widths.values()])

    def first_rows(split):
        return dataset[split].select(range(min(EVAL_ROWS, len(dataset[split]))))

    cache = None
    if teacher_cache is not None:
        width = (len(labels) if task else t_vocab) if with_logits else None
        needs = cache_files.needs_for(weights, mapping, t_shape.layers, width, task == "seq-cls", temperature,
                                      every_layer=cache_every_layer)
        rows = {"train": dataset["train"], "validation": first_rows("validation"), "test": first_rows("test")}
        key = cache_files.key_for(teacher_source.folder, tokenizer, rows, max_length, task)
        if not cached:
            from accelerate import PartialState

            start(config)  # a launch accelerate would not honour is refused before the cache is written
            if is_main_process():
                cache_files.write(teacher_cache, teacher_model, rows, collate, key, needs,
                                  device=PartialState().device, batch_size=config.batch_size)
            PartialState().wait_for_everyone()
            teacher_model = None  # training reads the cache only: let the teacher go
            gc.collect()
        cache = cache_files.open_cache(teacher_cache, key, needs)

    def teacher_outputs(batch):
        if cache is not None:
            return cache.outputs(batch)
        teacher_model.to(batch["input_ids"].device)
        with torch.no_grad():
            return teacher_model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)

    def loss_fn(model, batch):
        with ExitStack() as hooks:
            if weights.relation:  # DDP wraps the student: hook the module inside
                t_qkv = hooks.enter_context(capture_qkv(teacher_model, t_family, sorted(set(mapping))))
                s_qkv = hooks.enter_context(capture_qkv(getattr(model, "module", model), s_family,
                                                        range(len(mapping))))
            t = teacher_outputs(batch)
            s = model(**batch, output_hidden_states=True)  # with labels, transformers adds the task loss
        mask = batch["attention_mask"]
        terms = {}
        if weights.hidden:  # a cache holds no hidden states for a run that does not weigh them
            terms["hidden"] = hidden_loss(s.hidden_states, t.hidden_states, mapping, kind=hidden_kind, mask=mask)
        if weights.relation:
            terms["relation"] = torch.stack([attention_relation_loss(s_qkv[i], t_qkv[j], relation_heads, mask)
                                             for i, j in enumerate(mapping)]).mean()
        if getattr(s, "logits", None) is not None and weights.kl:
            top_k = getattr(t, "top_k", None)  # a cache keeps a vocabulary's top k only
            terms["kl"] = (topk_logit_kl(s.logits, *top_k, temperature, mask=mask) if top_k is not None else
                           logit_kl(s.logits, t.logits, temperature, mask=mask if s.logits.dim() == 3 else None))
        if "labels" in batch and weights.task:
            terms["task"] = s.loss
        if weights.pooled:
            terms["pooled"] = pooled_cosine(s.hidden_states[-1], t.hidden_states[-1], mask)
        return combine(terms, weights)

    def distill_loss(model, rows):
        losses = [loss_fn(model, {k: v.to(next(model.parameters()).device) for k, v in
                                  collate([rows[j] for j in range(i, min(i + 32, len(rows)))]).items()})[0]
                  for i in range(0, len(rows), 32)]
        loss = float(torch.stack(losses).mean())
        return {"distill_loss": loss, "score": -loss}

    def scorer(split):  # validation picks the checkpoint; test is scored once, on the one picked
        rows = first_rows(split)

        def evaluate(model):
            if task is None:
                return distill_loss(model, rows)
            # The whole split, as `reshape finetune` scores it, so the two compare.
            return {**score(model, dataset[split], collate, spec), "distill_loss": distill_loss(model, rows)["distill_loss"]}
        return evaluate

    run = {"teacher": teacher, "student": str(student), "data": data, "task": task, "weights": asdict(weights),
           "relation_heads": relation_heads,
           "temperature": temperature, "hidden_kind": hidden_kind, "map": mapping, "max_length": max_length,
           # only with a cache, so runs without one keep their fingerprints (and resume)
           **({"teacher_cache": cache.identity} if cache else {})}
    start(config)  # a launch accelerate would not honour is refused here, before OUT changes
    if overwrite and not resume:  # only now: a refused request must leave the old OUT as it was
        shutil.rmtree(out, ignore_errors=True)
    summary = train(student_model, loss_fn, dataset["train"], collate, out, config,
                    eval_fn=with_kappa(scorer("validation"), first_rows("validation"), collate, log_kappa),
                    test_fn=scorer("test"),
                    resume=resume, run=run, lengths=text_lengths(dataset["train"]), progress=progress)
    result = {"teacher": teacher, "data": data, "task": task, "layer_map": mapping, "weights": asdict(weights),
              "temperature": temperature, "config": asdict(config), **summary}
    if task is not None:
        result["head_from_teacher"] = head
    if cache is not None:
        result["teacher_cache"] = str(teacher_cache)
    weights = full_state_dict(student_model)  # every process: under FSDP2 it gathers the shards
    if is_main_process():
        student_model.save_pretrained(out, state_dict=weights)
        copy_extra_files(student, out)
        (out / "reshape.json").write_text(json.dumps({**(recipe or {}), "distillation": result}, indent=2) + "\n")
        write_card(out, student)
        umask_modes(out)  # safetensors writes 0600
        if not keep_checkpoints:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return result


def _labelled_text_task(name: str) -> Task:
    spec = get_task(name)
    if not (spec.labelled and spec.inputs != "image"):
        raise fail("task", name, "has no labels for distillation to add a task loss for",
                   "use --task seq-cls or token-cls, or leave --task out to distil on plain text")
    return spec


def _check_task_teacher(source, task: Task, labels: list[str]) -> None:
    """The teacher must have a fine-tuned head for `task`; a teacher without one would teach noise."""
    config = source.spec.config
    trained = _has_head(config, task)
    if not trained or config.num_labels != len(labels):
        has = f"a {config.num_labels}-label {task.name} head" if trained else f"no {task.name} head"
        raise fail("teacher", source.name, f"has {has}, but the data has {len(labels)} labels",
                   f"fine-tune the teacher on this data first: reshape finetune {source.name} --task {task.name} ...")


def _copy_task_head(teacher: torch.nn.Module, student: torch.nn.Module, task: Task) -> list[str]:
    """Start the student's task head (the weights outside the shared backbone) from the teacher's,
    unless the student was fine-tuned on the task itself; returns the copied weight names."""
    if _has_head(student.config, task):
        return []
    backbone = f"{teacher.base_model_prefix}."
    theirs, ours = teacher.state_dict(), student.state_dict()
    copied = [k for k, v in theirs.items()
              if not k.startswith(backbone) and k in ours and ours[k].shape == v.shape]
    with torch.no_grad():
        for key in copied:
            ours[key].copy_(theirs[key])
    return copied


def _head_from_files(folder: Path, student: torch.nn.Module, task: Task) -> list[str]:
    """_copy_task_head without the teacher model: its head's tensors read from its safetensors files."""
    from safetensors import safe_open

    if _has_head(student.config, task):
        return []
    backbone, ours, found = f"{student.base_model_prefix}.", student.state_dict(), set()
    with torch.no_grad():
        for file in safetensors_weights(folder, folder, field="teacher"):  # inside the folder only
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if (not key.startswith(backbone) and key in ours
                            and tuple(f.get_slice(key).get_shape()) == tuple(ours[key].shape)):
                        ours[key].copy_(f.get_tensor(key))
                        found.add(key)
    return [k for k in ours if k in found]  # in the model's order, as _copy_task_head lists them


def _has_head(config, task: Task) -> bool:
    """Whether the checkpoint was saved with `task`'s head (e.g. a ...ForSequenceClassification class)."""
    return any(a.endswith(task.auto_class.removeprefix("AutoModel")) for a in config.architectures or [])


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
