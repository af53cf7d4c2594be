"""Distillation throughput of reshape's loop against a bare PyTorch loop doing the same work, same run.

Teacher: the real all-MiniLM-L6-v2 (6 x 12); student: `reshape.convert("minilm", heads=24, depth=4)`
(kept layers 0,2,3,5). Data: the "rotten-tomatoes-full" recipe, max length 64, batch 32.

- reshape: `reshape.train.distill.distill` with TrainConfig(max_steps=W+N, batch_size=32, eval_every=None,
  log_every=W). The loop's `samples_per_s` in OUT/metrics.jsonl counts only the time from a batch's arrival
  to the end of its optimizer step (loss, backward, clipping, step, scheduler, zero_grad): data loading
  and collation, evaluation and checkpoint saving are outside it. It is cumulative over the epoch, so the
  N timed steps are the difference between its records at step W and step W+N: busy(k) = 32 k / speed(k).
- bare: the very batches reshape's loop received, in the same order (its collate function is wrapped to
  keep each collated batch), fed to a plain loop on freshly loaded copies of the same models: teacher
  forward under no_grad with output_hidden_states, student forward, `hidden_loss` with the same layer map,
  backward, gradient clipping to 1.0 (the loop's default), AdamW step, zero_grad. The same span is timed
  (collation excluded), W warm-up steps untimed.
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


def run_reshape(student: Path, out: Path, steps: int, warmup: int) -> tuple[float, list[dict], float]:
    """reshape's samples/s over the steps after `warmup`, the batches it trained on, and collate ms/batch."""
    import reshape.train.distill as distill_module
    from reshape.train.loop import TrainConfig

    batches, collate_s, original = [], [], distill_module.collator

    def recording_collator(*args, **kwargs):
        collate = original(*args, **kwargs)

        def wrapped(rows):
            start = time.perf_counter()
            batch = collate(rows)
            collate_s.append(time.perf_counter() - start)
            batches.append({k: v.clone() for k, v in batch.items() if k != "labels"})
            return batch
        return wrapped

    distill_module.collator = recording_collator
    try:
        config = TrainConfig(max_steps=warmup + steps, batch_size=BATCH, eval_every=None, log_every=warmup)
        distill_module.distill("minilm", student, out, data="rotten-tomatoes-full", config=config,
                               max_length=MAX_LENGTH)
    finally:
        distill_module.collator = original
    records = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if "samples_per_s" in r}
    busy = {k: BATCH * k / records[k]["samples_per_s"] for k in (warmup, warmup + steps)}
    speed = BATCH * steps / (busy[warmup + steps] - busy[warmup])
    trained = batches[:warmup + steps]  # later entries: the loop's look-ahead and the final evaluation
    return speed, trained, 1000 * sum(collate_s[:len(trained)]) / len(trained)


def run_bare(teacher_dir: str, student: Path, batches: list[dict], warmup: int) -> float:
    from transformers import AutoModel

    from reshape.train.losses import hidden_loss

    torch.manual_seed(0)
    teacher = AutoModel.from_pretrained(teacher_dir).eval().requires_grad_(False)
    model = AutoModel.from_pretrained(student).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    busy = 0.0
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        with torch.no_grad():
            t = teacher(**batch, output_hidden_states=True)
        s = model(**batch, output_hidden_states=True)
        loss = hidden_loss(s.hidden_states, t.hidden_states, MAP, mask=batch["attention_mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        loss.item()
        if i >= warmup:
            busy += time.perf_counter() - start
    return BATCH * (len(batches) - warmup) / busy


def measure(steps: int, warmup: int) -> dict:
    import reshape
    from reshape.presets import load_presets

    teacher_dir = str(load_presets()["minilm"].local_folder())
    with tempfile.TemporaryDirectory(prefix="reshape-bench-distill-") as tmp:
        tmp = Path(tmp)
        reshape.convert("minilm", tmp / "student", heads=24, depth=4)
        reshape_speed, batches, collate_ms = run_reshape(tmp / "student", tmp / "out", steps, warmup)
        bare_speed = run_bare(teacher_dir, tmp / "student", batches, warmup)
    tokens = [int(b["attention_mask"].shape[1]) for b in batches]
    ratio = bare_speed / reshape_speed
    return {"steps": steps, "warmup": warmup, "batch": BATCH, "max_length": MAX_LENGTH,
            "mean_padded_length": round(sum(tokens) / len(tokens), 1), "threads": torch.get_num_threads(),
            "bare_samples_per_s": round(bare_speed, 2), "reshape_samples_per_s": round(reshape_speed, 2),
            "collate_ms_per_batch": round(collate_ms, 1), "ratio": round(ratio, 3), "target": TARGET,
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
    numbers = measure(args.steps, args.warmup)
    print(json.dumps(numbers, indent=2) if args.json else report(numbers))


if __name__ == "__main__":
    main()
