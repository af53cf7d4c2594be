"""`--teacher-cache DIR`: the teacher's outputs on the distillation data, written once, read back per batch.

One pass of the teacher over the data writes what the chosen loss terms read from it, and nothing else:

- hidden states (weights.hidden > 0: the embeddings and each mapped teacher layer; weights.pooled > 0:
  the last layer), in bfloat16, which rounds each value to 2^-9 of itself;
- logits (weights.kl > 0, a student with a head): whole when they are small (a classifier's labels, or
  at most TOP_K per token), else the teacher's TOP_K most likely tokens per position, as log-probabilities
  at the run's temperature with their token ids (float32 and int32). The KL is then taken between the two
  distributions coarsened to TOP_K + 1 outcomes, those tokens and "any other" (`losses.topk_logit_kl`):
  never more than the full KL (merging outcomes cannot raise a KL), equal to it when the tail is spread
  as the student spreads it, and the tail's gradient still pushes the student's tail mass to the teacher's;
- the attention-relation term (MiniLMv2) would need every mapped layer's Q, K and V: a run with
  weights.relation > 0 is refused a cache rather than given a third store.

Each example is stored under the SHA-256 of its token ids (real tokens only), so the cache does not
depend on batch composition, padding, the shuffled order of an epoch, the seed or the split an example
is in, and a duplicate text is stored once. Examples live in safetensors files of about CHUNK_BYTES,
listed in `teacher-cache.json`; a batch opens only the files that hold its examples (memory-mapped,
closed again), so the process holds one batch of teacher outputs at a time.

The index records what the outputs depend on: the teacher's config and weight files (name, size,
modification time), the tokenizer, the data's text, max_length and the task. A run whose own values
differ is refused in one line; a run that needs layers or logits the cache lacks is refused likewise.
The folder is written under its lock beside it and renamed into place when complete (reshape.output).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from ..errors import fail
from ..output import locked, staged

TOP_K = 64  # tokens kept per position of a vocabulary's logits
CHUNK_BYTES = 16 << 20  # small enough that a batch's lookups read little more than they need
INDEX = "teacher-cache.json"
FORMAT = 1
KEY_FIELDS = {"teacher": "teacher config or weights", "tokenizer": "tokenizer", "data": "data",
              "max_length": "max_length", "task": "task"}


@dataclass(frozen=True)
class Needs:
    """What a run's loss terms read from the teacher."""

    hidden: tuple[int, ...]  # indices into hidden_states: 0 is the embeddings, i + 1 the output of layer i
    logits: str | None  # None, "whole" or "top-k"
    temperature: float | None = None  # only top-k log-probabilities depend on it
    top_k: int = TOP_K


def needs_for(weights, mapping: list[int], teacher_layers: int, logit_width: int | None, per_example: bool,
              temperature: float, every_layer: bool = False) -> Needs:
    """The stores a run with these loss weights reads. `logit_width` is None for a student without logits;
    `every_layer` stores all teacher layers (a sweep's points map different ones)."""
    hidden = set()
    if weights.hidden:
        hidden |= {0, *(j + 1 for j in mapping)}
    if weights.pooled:
        hidden.add(teacher_layers)
    if every_layer and hidden:
        hidden = set(range(teacher_layers + 1))
    logits = None
    if logit_width is not None and weights.kl:
        logits = "whole" if per_example or logit_width <= TOP_K else "top-k"
    return Needs(tuple(sorted(hidden)), logits, temperature if logits == "top-k" else None, TOP_K)


def key_for(teacher_folder: Path, tokenizer, splits: dict, max_length: int, task: str | None) -> dict:
    """What the teacher's outputs depend on, each as a short string or number (see the module docstring)."""
    files = sorted(p for p in Path(teacher_folder).iterdir()
                   if p.suffix in (".safetensors", ".bin", ".gguf", ".pt", ".pth") or p.name == "config.json")
    teacher = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    config = Path(teacher_folder) / "config.json"
    if config.is_file():  # its content, not its time: a rewritten but equal config keeps the cache
        teacher = [[*row[:2], _digest(config.read_bytes())] if row[0] == "config.json" else row for row in teacher]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    data = {name: list(rows[_input_column(rows)]) for name, rows in splits.items()}
    return {"teacher": _digest(json.dumps(teacher)), "tokenizer": _digest(f"{type(tokenizer).__name__}"
                                                                         f"{tokenizer.padding_side}{vocabulary}"),
            "data": _digest(json.dumps(data, sort_keys=True)), "max_length": max_length, "task": task}


def exists(folder: Path | None) -> bool:
    return folder is not None and (Path(folder) / INDEX).is_file()


def open_cache(folder: Path, key: dict, needs: Needs) -> TeacherCache:
    """The cache in `folder`, refused in one line when it was written for another run or lacks what this one needs."""
    folder = Path(folder)
    index = json.loads((folder / INDEX).read_text())
    fix = f"use another --teacher-cache folder (this run then writes it), or delete {folder} to rebuild it"
    if index.get("format") != FORMAT:
        raise fail("teacher_cache", folder, f"has format {index.get('format')}, not {FORMAT}", fix)
    for field, what in KEY_FIELDS.items():
        if index["key"][field] != key[field]:
            raise fail("teacher_cache", folder, f"was written for other {what} ({field} {index['key'][field]} "
                       f"there, {key[field]} in this run)", fix)
    stored = Needs(**{**index["needs"], "hidden": tuple(index["needs"]["hidden"])})
    missing = sorted(set(needs.hidden) - set(stored.hidden))
    if missing:
        raise fail("teacher_cache", folder, f"holds hidden states {_csv(stored.hidden) or 'none'} but this run's "
                   f"layer map and loss weights need {_csv(needs.hidden)}", fix)
    if needs.logits and (stored.logits, stored.temperature) != (needs.logits, needs.temperature):
        have = "no logits" if not stored.logits else f"{stored.logits} logits" + (
            f" at temperature {stored.temperature:g}" if stored.temperature else "")
        want = f"{needs.logits} logits" + (f" at temperature {needs.temperature:g}" if needs.temperature else "")
        raise fail("teacher_cache", folder, f"holds {have} but this run's KL term needs {want}", fix)
    return TeacherCache(folder, index, needs)


def write(folder: Path, teacher: nn.Module, splits: dict, collate, key: dict, needs: Needs, device,
          batch_size: int = 32) -> None:
    """One pass of `teacher` over the rows of `splits` (name -> rows), writing `folder` atomically: it appears
    complete, or not at all. A process that finds it written meanwhile (under the lock) keeps that one."""
    folder = Path(folder)
    with locked(folder):
        if exists(folder):
            return
        if folder.is_dir() and any(folder.iterdir()):
            raise fail("teacher_cache", folder, f"is not empty and holds no teacher cache (no {INDEX})",
                       "choose an empty or absent folder for the cache")
        teacher.to(device)
        with staged(folder, overwrite=True) as tmp:
            writer = _ChunkWriter(tmp)
            for name, rows in splits.items():
                lengths = [len(v) for v in list(rows[_input_column(rows)])]
                order = sorted(range(len(rows)), key=lengths.__getitem__)  # similar lengths pad less
                for start in range(0, len(order), batch_size):
                    batch = collate([rows[i] for i in order[start:start + batch_size]])
                    batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
                    with torch.no_grad():
                        out = teacher(**batch, output_hidden_states=True)
                    for i, tensors in enumerate(_per_example(out, batch, needs)):
                        writer.add(tensors, name)
            writer.close()
            (tmp / INDEX).write_text(json.dumps({"format": FORMAT, "key": key, "needs": asdict(needs),
                                                 "teacher_layers": len(out.hidden_states) - 1,
                                                 **writer.summary()}, indent=1) + "\n")


class TeacherCache:
    """Reads the teacher's outputs for a batch back from the cache, laid out as the teacher would give them."""

    def __init__(self, folder: Path, index: dict, needs: Needs):
        self.folder, self.index, self.needs = folder, index, needs
        self.layers = index["teacher_layers"]
        self.stored_hidden = index["needs"]["hidden"]

    @property
    def identity(self) -> dict:
        """What a resumed run must find again: the same cache contents."""
        return {**self.index["key"], "needs": self.index["needs"]}

    def outputs(self, batch: dict) -> SimpleNamespace:
        """hidden_states (a list over the teacher's layers, None where this run reads nothing), logits or
        top_k (log-probabilities, token ids), each [batch, tokens, ...] (logits [batch, labels] per example)."""
        ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
        names = [_name(ids[i][mask[i]]) for i in range(len(ids))]
        by_chunk = defaultdict(list)
        for i, name in enumerate(names):
            chunk = self.index["examples"].get(name)
            if chunk is None:
                raise fail("teacher_cache", self.folder, "has no teacher outputs for an example of this run "
                           "(its data, tokenizer or max_length changed since it was written)",
                           f"delete {self.folder} to rebuild it, or use another --teacher-cache folder")
            by_chunk[chunk].append(i)
        from safetensors import safe_open

        examples = [None] * len(names)
        for chunk, rows in by_chunk.items():
            with safe_open(str(self.folder / self.index["chunks"][chunk]), framework="pt") as f:
                keys = set(f.keys())
                for i in rows:
                    stored = {part: f.get_tensor(f"{names[i]}/{part}") for part in _PARTS
                              if f"{names[i]}/{part}" in keys}
                    if not torch.equal(stored["ids"].long(), ids[i][mask[i]]):
                        raise fail("teacher_cache", self.folder, "holds another sequence under an example's hash",
                                   f"delete {self.folder} to rebuild it")
                    examples[i] = stored
        device = batch["input_ids"].device
        shape = tuple(mask.shape)
        hidden = [None] * (self.layers + 1)
        for slot, index in enumerate(self.stored_hidden):
            if index in self.needs.hidden:
                hidden[index] = _scatter([e["hidden"][slot] for e in examples], mask, shape).to(device)
        logits = top_k = None
        if self.needs.logits == "whole":
            per_token = examples[0]["logits"].dim() == 2
            logits = (_scatter([e["logits"] for e in examples], mask, shape) if per_token
                      else torch.stack([e["logits"] for e in examples])).to(device)
        elif self.needs.logits == "top-k":
            top_k = (_scatter([e["top_values"] for e in examples], mask, shape).to(device),
                     _scatter([e["top_ids"] for e in examples], mask, shape).long().to(device))
        return SimpleNamespace(hidden_states=hidden, logits=logits, top_k=top_k)


_PARTS = ("ids", "hidden", "logits", "top_values", "top_ids")


def _per_example(out, batch: dict, needs: Needs):
    """Each example's tensors without its padding, as the cache stores them."""
    mask = batch["attention_mask"].bool()
    for i in range(len(mask)):
        real = mask[i]
        tensors = {"ids": batch["input_ids"][i][real].to(torch.int32)}
        if needs.hidden:
            tensors["hidden"] = torch.stack([out.hidden_states[j][i][real] for j in needs.hidden]).to(torch.bfloat16)
        if needs.logits:
            logits = out.logits[i][real] if out.logits.dim() == 3 else out.logits[i]
            if needs.logits == "whole":
                tensors["logits"] = logits.float()
            else:
                values, indices = (logits.float() / needs.temperature).log_softmax(-1).topk(needs.top_k, dim=-1)
                tensors["top_values"], tensors["top_ids"] = values, indices.to(torch.int32)
        yield {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


class _ChunkWriter:
    """Examples into safetensors files of about CHUNK_BYTES each, and where each one went."""

    def __init__(self, folder: Path):
        self.folder, self.pending, self.size = folder, {}, 0
        self.chunks, self.examples, self.counts = [], {}, defaultdict(int)

    def add(self, tensors: dict[str, Tensor], split: str) -> None:
        self.counts[split] += 1
        name = _name(tensors["ids"])
        if name in self.examples or any(k.startswith(f"{name}/") for k in self.pending):
            return  # the same tokens: the same teacher outputs
        self.pending.update({f"{name}/{part}": t for part, t in tensors.items()})
        self.size += sum(t.numel() * t.element_size() for t in tensors.values())
        self.examples[name] = len(self.chunks)
        if self.size >= CHUNK_BYTES:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if self.pending:
            file = f"chunk-{len(self.chunks):05d}.safetensors"
            save_file(self.pending, str(self.folder / file))
            self.chunks.append(file)
            self.pending, self.size = {}, 0

    def close(self) -> None:
        self._flush()

    def summary(self) -> dict:
        return {"rows": dict(self.counts), "unique_examples": len(self.examples), "chunks": self.chunks,
                "examples": self.examples}


def _scatter(values: list[Tensor], mask: Tensor, shape: tuple[int, int]) -> Tensor:
    """Per-example [tokens, ...] tensors put back at their real positions of a padded [batch, tokens, ...] batch
    (zeros where padded: every loss masks those out)."""
    first = values[0]
    out = torch.zeros(*shape, *first.shape[1:], dtype=torch.float32 if first.is_floating_point() else first.dtype)
    out[mask] = torch.cat(values).to(out.dtype)
    return out


def _name(ids: Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:32]


def _input_column(rows) -> str:
    return "tokens" if "tokens" in rows.column_names else "text"


def _digest(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()[:16]


def _csv(values) -> str:
    return ",".join(str(v) for v in values)
