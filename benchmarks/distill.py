"""Distillation throughput of reshape's loop against a bare PyTorch loop doing the same work, same run.

Teacher: the real all-MiniLM-L6-v2 (6 x 12); student: `reshape.convert("minilm", heads=24, depth=4)`
(kept layers 0,2,3,5). Data: the "rotten-tomatoes-full" recipe, max length 64, batch 32.

- reshape: `reshape.train.distill.distill` with TrainConfig(max_steps=W+N, batch_size=32, eval_every=None,
  log_every=W). The loop's `samples_per_s` in OUT/metrics.jsonl counts only the time from a batch's arrival
  to the end of its optimizer step (loss, backward, clipping, step, scheduler, zero_grad): data loading
  and collation, evaluation and checkpoint saving are outside it. It is cumulative over the epoch, so the
  N timed steps are the difference between its records at step W and step W+N: busy(k) = 32 k / speed(k).
- bare: a plain loop on freshly loaded copies of the same teacher and student, fed the very batches
  reshape's loop receives, in the same order: the loop's collate function is wrapped, and each batch it
  collates is first trained on by the bare loop (teacher forward under no_grad with output_hidden_states,
  student forward, `hidden_loss` with the layer map 0,2,3,5, backward, gradient clipping to 1.0 as the
  loop does by default, AdamW step, zero_grad), timed alone. The two loops thus alternate step by step,
  so a busy machine slows both alike. The first W bare steps are untimed too.
- `collate ms` is the time the shared collator takes per batch (excluded from both speeds).

    python benchmarks/distill.py [--steps 30] [--warmup 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

TARGET = 1.3  # bare samples/s over reshape samples/s
BATCH, MAX_LENGTH, MAP = 32, 64, [0, 2, 3, 5]


class Bare:
    """The plain loop, one step at a time, on freshly loaded copies of the same teacher and student."""

    def __init__(self, teacher_dir: str, student: Path):
        from transformers import AutoModel

        self.teacher = AutoModel.from_pretrained(teacher_dir).eval().requires_grad_(False)
        self.model = AutoModel.from_pretrained(student).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=5e-5, weight_decay=0.01)

    def step(self, batch: dict) -> float:
        from reshape.train.losses import hidden_loss

        start = time.perf_counter()
        with torch.no_grad():
            t = self.teacher(**batch, output_hidden_states=True)
        s = self.model(**batch, output_hidden_states=True)
        loss = hidden_loss(s.hidden_states, t.hidden_states, MAP, mask=batch["attention_mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        loss.item()
        return time.perf_counter() - start


def run_both(teacher_dir: str, student: Path, out: Path, steps: int, warmup: int) -> dict:
    """Distil with reshape while the bare loop trains on each batch as reshape's loader collates it."""
    import reshape.train.distill as distill_module
    from reshape.train.loop import TrainConfig

    bare, total = Bare(teacher_dir, student), warmup + steps
    bare_s, collate_s, lengths, original = [], [], [], distill_module.collator

    def interleaving_collator(*args, **kwargs):
        collate = original(*args, **kwargs)

        def wrapped(rows):
            start = time.perf_counter()
            batch = collate(rows)
            if len(bare_s) < total:  # later calls: the final evaluation
                collate_s.append(time.perf_counter() - start)
                lengths.append(batch["input_ids"].shape[1])
                bare_s.append(bare.step({k: v for k, v in batch.items() if k != "labels"}))
            return batch
        return wrapped

    distill_module.collator = interleaving_collator
    try:
        config = TrainConfig(max_steps=total, batch_size=BATCH, eval_every=None, log_every=warmup)
        distill_module.distill("minilm", student, out, data="rotten-tomatoes-full", config=config,
                               max_length=MAX_LENGTH)
    finally:
        distill_module.collator = original
    records = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if "samples_per_s" in r}
    busy = {k: BATCH * k / records[k]["samples_per_s"] for k in (warmup, total)}
    return {"bare": BATCH * steps / sum(bare_s[warmup:]), "reshape": BATCH * steps / (busy[total] - busy[warmup]),
            "collate_ms": 1000 * sum(collate_s) / len(collate_s), "mean_length": sum(lengths) / len(lengths)}


def measure(steps: int, warmup: int) -> dict:
    import reshape
    from reshape.presets import load_presets

    teacher_dir = str(load_presets()["minilm"].local_folder())
    with tempfile.TemporaryDirectory(prefix="reshape-bench-distill-") as tmp:
        tmp = Path(tmp)
        reshape.convert("minilm", tmp / "student", heads=24, depth=4)
        speeds = run_both(teacher_dir, tmp / "student", tmp / "out", steps, warmup)
    ratio = speeds["bare"] / speeds["reshape"]
    return {"steps": steps, "warmup": warmup, "batch": BATCH, "max_length": MAX_LENGTH,
            "mean_padded_length": round(speeds["mean_length"], 1), "threads": torch.get_num_threads(),
            "bare_samples_per_s": round(speeds["bare"], 2), "reshape_samples_per_s": round(speeds["reshape"], 2),
            "collate_ms_per_batch": round(speeds["collate_ms"], 1), "ratio": round(ratio, 3), "target": TARGET,
            "pass": ratio <= TARGET}


def report(n: dict) -> str:
    rows = [("bare samples/s", f"{n['bare_samples_per_s']:.1f}"),
            ("reshape samples/s", f"{n['reshape_samples_per_s']:.1f}"),
            ("ratio bare/reshape", f"{n['ratio']:.3f}"),
            ("target", f"<= {n['target']}"),
            ("result", "PASS" if n["pass"] else "FAIL")]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines.append(f"MiniLM 6x12 -> 4x24 student, batch {n['batch']}, max length {n['max_length']} "
                 f"(mean padded {n['mean_padded_length']}), {n['steps']} timed steps after {n['warmup']} "
                 f"warm-up; collate {n['collate_ms_per_batch']:.0f} ms/batch (untimed); "
                 f"{n['threads']} torch threads")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1 (the loop logs its speed at step --warmup)")
    numbers = measure(args.steps, args.warmup)
    print(json.dumps(numbers, indent=2) if args.json else report(numbers))


if __name__ == "__main__":
    main()
