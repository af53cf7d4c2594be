"""Distillation losses: pure functions on tensors, plus hooks that capture Q/K/V projections.

The teacher is the source model, the student its reshaped copy. Every loss treats the teacher's tensors
as constants (detached) and computes in float32, so bf16 activations keep the small differences the
losses are made of. Masks are [batch, tokens] attention masks (1 = real token); padded positions never
count, whatever their values.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import validate
from ..errors import fail
from ..plan import select_layers

HIDDEN_KINDS = ("mse", "cosine")
RELATIONS = ("q", "k", "v")


# --- which teacher layer each student layer learns from ---------------------------------------------


def layer_map(recipe: dict | None, teacher_layers: int, student_layers: int,
              explicit: Sequence[int] | None = None) -> list[int]:
    """For each student layer, the index of the teacher layer whose output it should match.

    An explicit map wins; else the recipe's kept layers (reshape.json `plan.keep`): each student layer
    starts as a copy of that teacher layer, so matching it keeps the copy's role.
    """
    example = _csv(select_layers(teacher_layers, student_layers, "uniform")) \
        if 1 <= student_layers <= teacher_layers else "0,2,4,..."
    if explicit is not None:
        mapping = [int(i) for i in explicit]
        reason = _mapping_problem(mapping, teacher_layers, student_layers)
        if reason:
            raise fail("layer_map", _csv(mapping), reason,
                       f"list one teacher layer per student layer, increasing, e.g. {example}")
        return mapping
    if recipe is None:
        raise fail("layer_map", None, "the student has no reshape.json to map its layers to the teacher's",
                   f"pass --layer-map {example}")
    keep = recipe.get("plan", {}).get("keep")
    if keep is None:
        raise fail("reshape.json", "plan.keep", "is missing, so the student's layers cannot be mapped to the teacher's",
                   f"pass --layer-map {example}")
    source_layers = recipe.get("source_shape", {}).get("layers")
    if source_layers is not None and source_layers != teacher_layers:
        raise fail("teacher_layers", teacher_layers,
                   f"differs from the {source_layers} layers of the model the student was made from (reshape.json)",
                   "distil from the model the student was converted from, or pass --layer-map")
    mapping = [int(i) for i in keep]
    reason = _mapping_problem(mapping, teacher_layers, student_layers)
    if reason:
        raise fail("reshape.json plan.keep", _csv(mapping), reason, f"pass --layer-map {example}")
    return mapping


def _mapping_problem(mapping: list[int], teacher_layers: int, student_layers: int) -> str | None:
    if len(mapping) != student_layers:
        return f"lists {len(mapping)} layers but the student has {student_layers}"
    outside = [i for i in mapping if not 0 <= i < teacher_layers]
    if outside:
        return f"has indices {_csv(outside)} outside the teacher's layers 0..{teacher_layers - 1}"
    if any(a >= b for a, b in zip(mapping, mapping[1:])):
        return "is not strictly increasing (deeper student layers match deeper teacher layers)"
    return None


# --- losses ------------------------------------------------------------------------------------------


def logit_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 2.0,
             mask: Tensor | None = None) -> Tensor:
    """KL(teacher || student) between the distributions softened by `temperature`, times T² so the
    gradients keep their size whatever T is (Hinton et al. 2015).

    Logits are [batch, classes] or per token [batch, tokens, vocab] with `mask` [batch, tokens];
    the KL is averaged over examples, or over unmasked tokens.
    """
    _same_shape("logits", student_logits, teacher_logits)
    validate.check(temperature=temperature)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, reduction="none", log_target=True).sum(-1)
    return _masked_mean(kl, mask) * temperature**2


def topk_logit_kl(student_logits: Tensor, teacher_top_log_probs: Tensor, teacher_top_ids: Tensor,
                  temperature: float = 2.0, mask: Tensor | None = None) -> Tensor:
    """logit_kl when only the teacher's k most likely tokens per position are known (a teacher cache).

    `teacher_top_log_probs` are the teacher's log-probabilities at `temperature` of the tokens
    `teacher_top_ids` ([..., k] each). Both distributions are coarsened to k + 1 outcomes, the k tokens and
    "any other token", and the KL is taken between those: by the log-sum inequality never above the full
    KL, and equal to it when the student spreads its tail mass as the teacher does. Times T², as logit_kl.
    """
    validate.check(temperature=temperature)
    _same_shape("top-k ids", teacher_top_ids, teacher_top_log_probs)
    if tuple(teacher_top_ids.shape[:-1]) != tuple(student_logits.shape[:-1]):
        raise fail("top-k logits", f"{tuple(teacher_top_ids.shape)} vs {tuple(student_logits.shape)}",
                   "do not cover the student's positions", "read them from a cache of the same batch")
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    s_top = student.gather(-1, teacher_top_ids)
    # The student's tail, exactly: logsumexp over the tokens outside the top k (1 - sum would cancel).
    s_tail = student.scatter(-1, teacher_top_ids, float("-inf")).logsumexp(-1)
    t_top = teacher_top_log_probs.detach().float()
    p_top = t_top.exp()
    p_tail = (1 - p_top.sum(-1)).clamp(min=0)  # rounding can push the k tokens' sum past 1
    # xlogy: a tail of exactly 0 contributes 0, never 0 * log 0
    kl = (p_top * (t_top - s_top)).sum(-1) + torch.xlogy(p_tail, p_tail) - p_tail * s_tail
    return _masked_mean(kl, mask) * temperature**2


def hidden_loss(student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor], mapping: Sequence[int],
                kind: str = "mse", mask: Tensor | None = None, include_embeddings: bool = True) -> Tensor:
    """Distance between student layer outputs and the teacher layer outputs they map to.

    The inputs are transformers' `hidden_states` tuples: index 0 is the embeddings output, index i+1
    the output of layer i. Student layer i matches teacher layer mapping[i]; the embeddings match each
    other when `include_embeddings`. "mse" is the squared error averaged over hidden dims (TinyBERT),
    "cosine" is 1 - cos per token (DistilBERT). Averaged over the mapped layers and unmasked tokens.
    """
    check_hidden_kind(kind, "kind")
    if len(student_hidden) != len(mapping) + 1:
        raise fail("layer_map", _csv(mapping), f"maps {len(mapping)} student layers but the student has "
                   f"{len(student_hidden) - 1} (hidden_states holds the embeddings, then one entry per layer)",
                   "list one teacher layer per student layer")
    if max(mapping, default=-1) >= len(teacher_hidden) - 1 or min(mapping, default=0) < 0:
        raise fail("layer_map", _csv(mapping), f"points outside the teacher's layers 0..{len(teacher_hidden) - 2}",
                   "list teacher layers that exist")
    pairs = [(0, 0)] if include_embeddings else []
    pairs += [(i + 1, j + 1) for i, j in enumerate(mapping)]
    per_token = torch.stack([_hidden_distance(student_hidden[s], teacher_hidden[t], kind) for s, t in pairs])
    return _masked_mean(per_token.mean(0), mask)


def check_hidden_kind(kind: str, field: str = "hidden_kind") -> None:
    if kind not in HIDDEN_KINDS:
        raise fail(field, kind, "is not a hidden-state distance", f"use one of {', '.join(HIDDEN_KINDS)}")


def _hidden_distance(student: Tensor, teacher: Tensor, kind: str) -> Tensor:
    """Per-token distance [batch, tokens] between two [batch, tokens, width] hidden states."""
    if student.shape[-1] != teacher.shape[-1]:
        raise fail("hidden", f"{student.shape[-1]} vs {teacher.shape[-1]}",
                   "the student's hidden width differs from the teacher's, so their states cannot be compared",
                   "distil hidden states between models of the same width (reshape keeps it), or set its weight to 0")
    _same_shape("hidden states", student, teacher)
    student, teacher = student.float(), teacher.detach().float()
    if kind == "mse":
        return (student - teacher).pow(2).mean(-1)
    return 1 - F.cosine_similarity(student, teacher, dim=-1)


def attention_relation_loss(student_qkv: dict[str, Tensor], teacher_qkv: dict[str, Tensor], relation_heads: int,
                            mask: Tensor | None = None) -> Tensor:
    """MiniLMv2 self-attention relation distillation between one student and one teacher layer.

    Each of Q, K, V ([batch, tokens, width], heads concatenated) is split into `relation_heads` equal
    chunks whatever the model's own heads are, so students with more heads or narrower grouped KV
    projections compare with their teacher. Per chunk, softmax(X Xᵀ / √d) over the keys gives a
    relation; the loss is KL(teacher || student) summed over keys, averaged over relation heads,
    unmasked query tokens and the three relations Q-Q, K-K, V-V.
    """
    for who, qkv in (("student", student_qkv), ("teacher", teacher_qkv)):
        missing = [r for r in RELATIONS if r not in qkv]
        if missing:
            raise fail(f"{who}_qkv", ",".join(sorted(qkv)), f"lacks {', '.join(missing)}",
                       "capture q, k and v with capture_qkv")
    check_relation_heads(relation_heads, [x.shape[-1] for qkv in (student_qkv, teacher_qkv)
                                          for x in (qkv[r] for r in RELATIONS)])
    for r in RELATIONS:
        s, t = student_qkv[r].shape, teacher_qkv[r].shape
        if len(s) != 3 or s[:-1] != t[:-1]:
            raise fail(f"{r} projections", f"{tuple(s)} vs {tuple(t)}",
                       "are not [batch, tokens, width] over the same batch and tokens",
                       "run both models on the same batch and capture with capture_qkv")
    if mask is not None and tuple(mask.shape) != tuple(student_qkv["q"].shape[:2]):
        raise fail("mask", tuple(mask.shape), f"does not match the {tuple(student_qkv['q'].shape[:2])} tokens",
                   "pass the [batch, tokens] attention mask of these inputs")
    key_mask = None if mask is None else mask.bool()
    per_relation = []
    for r in RELATIONS:
        student = _relation_log_probs(student_qkv[r].float(), relation_heads, key_mask)
        teacher = _relation_log_probs(teacher_qkv[r].detach().float(), relation_heads, key_mask)
        p_teacher = teacher.exp()
        if key_mask is not None:
            # Padded keys have probability 0; zero their logs too, so 0 * (-inf) never makes a NaN.
            padded = ~key_mask[:, None, None, :]
            student, teacher = student.masked_fill(padded, 0), teacher.masked_fill(padded, 0)
            p_teacher = p_teacher.masked_fill(padded, 0)
        kl = (p_teacher * (teacher - student)).sum(-1).mean(1)  # [batch, query tokens]
        per_relation.append(_masked_mean(kl, mask))
    return torch.stack(per_relation).mean()


def check_relation_heads(relation_heads: int, widths: Sequence[int]) -> None:
    """Each Q/K/V width must split into `relation_heads` equal chunks."""
    widths = sorted(set(widths))
    if relation_heads < 1 or any(w % relation_heads for w in widths):
        common = math.gcd(*widths)
        choices = [d for d in range(1, min(common, 64) + 1) if common % d == 0]
        raise fail("relation_heads", relation_heads, f"does not divide every Q/K/V width ({_csv(widths)})",
                   f"use one of {', '.join(map(str, choices))}")


def _relation_log_probs(x: Tensor, heads: int, key_mask: Tensor | None) -> Tensor:
    """log softmax(X Xᵀ / √d) per relation head: [batch, heads, queries, keys]."""
    batch, tokens, width = x.shape
    d = width // heads
    x = x.view(batch, tokens, heads, d).transpose(1, 2)
    scores = x @ x.transpose(-1, -2) / math.sqrt(d)
    if key_mask is not None:
        # The most negative float rather than -inf: a row with every key padded stays finite (uniform).
        scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return scores.log_softmax(-1)


def pooled_cosine(student_last_hidden: Tensor, teacher_last_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """1 - cosine between mean-pooled sentence embeddings (sentence-transformers MiniLM pools by mean
    over real tokens), averaged over the batch."""
    if student_last_hidden.shape[-1] != teacher_last_hidden.shape[-1]:
        raise fail("hidden", f"{student_last_hidden.shape[-1]} vs {teacher_last_hidden.shape[-1]}",
                   "the student's embedding width differs from the teacher's, so they cannot be compared",
                   "distil pooled embeddings between models of the same width, or set its weight to 0")
    _same_shape("last hidden states", student_last_hidden, teacher_last_hidden)
    student = mean_pool(student_last_hidden.float(), mask)
    teacher = mean_pool(teacher_last_hidden.detach().float(), mask)
    return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()


def task_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Cross entropy against labels aligned with the logits: [batch] for [batch, classes], or
    [batch, tokens] for [batch, tokens, vocab] (shift them yourself for next-token prediction).
    A batch whose labels are all ignored gives 0, not NaN."""
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise fail("labels", tuple(labels.shape), f"do not line up with logits of shape {tuple(logits.shape)}",
                   "give one label per example, or per token for token-level logits")
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels, ignore_index=ignore_index,
                            reduction="sum")
    return total / (labels != ignore_index).sum().clamp(min=1)


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the positions the mask keeps; where() rather than a product, so that padded values,
    even inf or NaN, cannot leak in."""
    if mask is None:
        return values.mean()
    if tuple(mask.shape) != tuple(values.shape):
        raise fail("mask", tuple(mask.shape), f"does not match the {tuple(values.shape)} positions being averaged",
                   "pass the [batch, tokens] attention mask of these inputs")
    keep = mask.bool()
    return torch.where(keep, values, 0).sum() / keep.sum().clamp(min=1)


def mean_pool(hidden: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return hidden.mean(1)
    keep = mask.bool()[..., None]
    return torch.where(keep, hidden, 0).sum(1) / keep.sum(1).clamp(min=1)


def _same_shape(what: str, student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape:
        raise fail(what, f"{tuple(student.shape)} vs {tuple(teacher.shape)}",
                   "the student's and the teacher's differ in shape",
                   "run both on the same batch, with the same vocabulary or labels")


# --- weighting ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillWeights:
    """How much each loss term counts in the total; 0 turns a term off."""

    kl: float = 1.0  # the teacher's soft targets carry most of what distillation transfers (Hinton et al.)
    hidden: float = 1.0  # reshape keeps the width, so layer outputs compare directly, with no projection to learn
    relation: float = 0.0  # opt in: needs Q/K/V hooks and a tokens x tokens matrix per relation head (MiniLMv2)
    pooled: float = 0.0  # opt in: only sentence-embedding models are used through a pooled vector
    task: float = 1.0  # counts only when the batch has labels; without labels there is no task term to weight

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise fail(f"weights.{f.name}", value, "must be a finite number >= 0", "use 0 to turn the term off")
        self.check_trains({f.name for f in fields(self)})

    def check_trains(self, applicable: set[str]) -> None:
        """Refuse weights under which nothing trains: every term that applies has weight 0 (the task term
        applies only to labelled data, the KL only to a student with logits)."""
        if not any(getattr(self, name) for name in applicable):
            given = ",".join(f"{f.name}={getattr(self, f.name):g}" for f in fields(self))
            raise fail("weights", given, f"every loss term that applies ({', '.join(sorted(applicable))}) has weight "
                       "0, so nothing would train", f"give one of them a positive weight, e.g. --{min(applicable)} 1")


def combine(terms: dict[str, Tensor], weights: DistillWeights = DistillWeights()) -> tuple[Tensor, dict[str, float]]:
    """The weighted sum of the loss terms, and each used term's unweighted value as a float for logging.

    Terms with weight 0 are left out entirely, so a NaN in a term that is off cannot spoil the total.
    """
    names = [f.name for f in fields(DistillWeights)]
    total, logged = None, {}
    for name, value in terms.items():
        if name not in names:
            raise fail("loss", name, "is not a loss term", f"use one of {', '.join(names)}")
        weight = getattr(weights, name)
        if weight == 0:
            continue
        total = value * weight if total is None else total + value * weight
        logged[name] = float(value.detach())
    if total is None:
        raise fail("weights", ",".join(terms) or "(no terms)", "every loss term given has weight 0, so nothing trains",
                   f"give at least one of {', '.join(terms) or ', '.join(names)} a positive weight")
    return total, logged


# --- capturing Q/K/V ---------------------------------------------------------------------------------


@contextmanager
def capture_qkv(model: nn.Module, family, layer_indices: Sequence[int]) -> Iterator[dict[int, dict[str, Tensor]]]:
    """Record the Q/K/V projection outputs ([batch, tokens, width], heads concatenated) of the given
    blocks during forward passes inside the `with`, as {layer index: {"q", "k", "v"}}.

    The dict holds the latest forward's outputs, with their autograd graph (the student's need it).
    A fused projection (GPT-2's c_attn, timm's qkv) is split into q, k, v by the family's shape. The
    hooks are removed on exit, also when the body raises.
    """
    blocks = family.layers(model)
    indices = list(layer_indices)
    outside = [i for i in indices if not 0 <= i < len(blocks)]
    if outside:
        raise fail("layers", _csv(outside), f"are outside the model's layers 0..{len(blocks) - 1}",
                   "capture layers that exist")
    shape = family.shape(family.spec(model).config)
    widths = shape.role_widths
    captured: dict[int, dict[str, Tensor]] = {i: {} for i in indices}
    handles = []
    try:
        for i in indices:
            for proj in family.weights.attn_in:
                module = blocks[i].get_submodule(proj.name)
                handles.append(module.register_forward_hook(_recorder(captured[i], proj, widths)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _recorder(store: dict[str, Tensor], proj, widths: dict[str, int]):
    sizes = [widths[role] for role in proj.roles]

    def hook(module, args, output):
        if output.shape[-1] != sum(sizes):
            raise fail(proj.name, output.shape[-1], f"outputs a width other than the {'+'.join(map(str, sizes))} "
                       "its config gives", "check that the model's config matches its weights")
        for role, part in zip(proj.roles, output.split(sizes, dim=-1)):
            store[role] = part

    return hook


def _csv(values) -> str:
    return ",".join(str(v) for v in values)
