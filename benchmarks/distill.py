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

`--teacher-cache`: distillation with `--teacher-cache` against without it, for MiniLM (the student above, on
the first 1,500 reviews of rotten-tomatoes-full, batch 32, max length 64) and for SmolLM2-135M (the offline
GGUF dequantised into a plain 30 x 9 folder; student 15 x 18 with --keep-head-dim, on the first 200 16-line
blocks of Hamlet, batch 4, max length 64, cosine hidden distance as in benchmarks/recover_lm.py). For each
model one process first writes the cache (one teacher pass, plus one training step), then fresh processes
alternate without and with it (`--rounds 2`: without, with, with, without). Each run is `distill` for W+N
steps; samples/s over the N timed steps is read from its metrics log as above, and its peak RSS is the
process's own (ru_maxrss from wait4, so the parent's memory never counts). For SmolLM2 a last process
compares the top-64 KL with the full KL on one batch of the undistilled student.

    python benchmarks/distill.py --teacher-cache [--steps 30] [--warmup 3] [--rounds 1] [--models minilm,smollm2]
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


# --- --teacher-cache: with the cache against without it, each run a fresh process ---------------------------

CACHE_MODELS = {  # rows of data: enough training rows (72% of them) for warm-up + timed steps of one epoch
    "minilm": dict(title="MiniLM 6x12 -> 4x24", batch=32, max_length=64, rows=1500, hidden_kind="mse"),
    "smollm2": dict(title="SmolLM2-135M 30x9 -> 15x18", batch=4, max_length=64, rows=200, hidden_kind="cosine"),
}


def prepare(name: str, root: Path) -> dict:
    """Teacher and student folders and a JSON-lines data file for `name`, under `root`."""
    import reshape
    from reshape.presets import load_presets
    from reshape.train.data import load_data

    rows = CACHE_MODELS[name]["rows"]
    if name == "minilm":
        teacher = str(load_presets()["minilm"].local_folder())
        reshape.convert("minilm", root / "student", heads=24, depth=4)
        texts = list(load_data("rotten-tomatoes-full", task="embedding")["train"]["text"])[:rows]
    else:
        teacher = str(root / "teacher")
        reshape.convert("smollm2", teacher, heads=9, depth=30)  # the GGUF as a plain folder, once
        reshape.convert(teacher, root / "student", heads=18, depth=15, keep_head_dim=True)
        texts = list(load_data("hamlet", task="causal-lm")["train"]["text"])[:rows]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return {"teacher": teacher, "student": str(root / "student"), "data": str(data), "cache": str(root / "cache"),
            "rows": len(texts)}


def child(spec: dict) -> None:
    """One run in this fresh process: distil, then print the timed steps' samples/s as JSON."""
    from reshape.train.distill import distill
    from reshape.train.loop import TrainConfig

    model, total = CACHE_MODELS[spec["model"]], spec["warmup"] + spec["steps"]
    out = Path(spec["out"])
    config = TrainConfig(max_steps=total, batch_size=model["batch"], eval_every=None, log_every=max(1, spec["warmup"]))
    distill(spec["teacher"], spec["student"], out, data=spec["data"], config=config, max_length=model["max_length"],
            hidden_kind=model["hidden_kind"], teacher_cache=spec["cache"])
    records = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if "samples_per_s" in r}
    if spec["steps"] + spec["warmup"] == 1:  # the run that writes the cache: one step, nothing to time
        print(json.dumps({}))
        return
    batch, warm = model["batch"], spec["warmup"]
    busy = {k: batch * k / records[k]["samples_per_s"] for k in (warm, total)}
    print(json.dumps({"samples_per_s": batch * spec["steps"] / (busy[total] - busy[warm])}))


def topk_check(spec: dict) -> None:
    """Top-64 KL against the full KL for the undistilled SmolLM2 student on the first batch of the data."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reshape.train.losses import logit_kl, topk_logit_kl
    from reshape.train.teacher_cache import TOP_K

    model = CACHE_MODELS[spec["model"]]
    tokenizer = AutoTokenizer.from_pretrained(spec["student"])
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    texts = [json.loads(line)["text"] for line in Path(spec["data"]).read_text().splitlines()[:model["batch"]]]
    batch = tokenizer(texts, truncation=True, max_length=model["max_length"], padding=True, return_tensors="pt")
    with torch.no_grad():
        t = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32)(**batch).logits
        s = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)(**batch).logits
        values, ids = (t / 2.0).log_softmax(-1).topk(TOP_K, dim=-1)
        full = float(logit_kl(s, t, 2.0, batch["attention_mask"]))
        top = float(topk_logit_kl(s, values, ids, 2.0, batch["attention_mask"]))
        tail = float((1 - values.exp().sum(-1))[batch["attention_mask"].bool()].mean())
    print(json.dumps({"full_kl": full, "topk_kl": top, "k": TOP_K, "teacher_tail_mass": tail}))


def run_child(spec: dict, mode: str = "--child") -> tuple[dict, float, float]:
    """Run `spec` in a fresh Python process: (its JSON line, its peak RSS in MB, its wall seconds)."""
    import os
    import subprocess
    import sys

    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen([sys.executable, __file__, mode, json.dumps(spec)], stdout=stdout, stderr=stderr,
                                   text=True)
        # wait4 rather than Popen.wait: it also returns this child's own resource usage (peak RSS in KiB)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        stdout.seek(0), stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    if process.returncode:
        raise SystemExit(f"{mode} {spec.get('label', '')} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss / 1024, wall


def measure_cache(names: list[str], steps: int, warmup: int, rounds: int) -> list[dict]:
    results = []
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"reshape-bench-cache-{name}-") as tmp:
            root = Path(tmp)
            paths = prepare(name, root)
            base = {"model": name, **paths}
            write, write_rss, write_s = run_child({**base, "out": str(root / "write"), "steps": 1, "warmup": 0,
                                                   "label": "cache write"})
            size = sum(f.stat().st_size for f in (root / "cache").iterdir())
            runs = {"without": [], "with": []}
            order = ["without", "with", "with", "without"] * ((rounds + 1) // 2)
            for i, kind in enumerate(order[:2 * rounds]):
                spec = {**base, "cache": paths["cache"] if kind == "with" else None, "out": str(root / f"run{i}"),
                        "steps": steps, "warmup": warmup, "label": kind}
                speed, rss, _ = run_child(spec)
                runs[kind].append({"samples_per_s": speed["samples_per_s"], "peak_rss_mb": rss})
            check = run_child({**base, "label": "top-k check"}, "--topk-check")[0] if name == "smollm2" else None
        mean = {k: {m: sum(r[m] for r in v) / len(v) for m in ("samples_per_s", "peak_rss_mb")}
                for k, v in runs.items()}
        results.append({"model": name, **CACHE_MODELS[name], "rows": paths["rows"], "steps": steps, "warmup": warmup,
                        "rounds": rounds, "cache_write_s": write_s, "cache_write_rss_mb": write_rss,
                        "cache_mb": size / 2**20, "runs": runs, "mean": mean,
                        "speed_ratio": mean["with"]["samples_per_s"] / mean["without"]["samples_per_s"],
                        "rss_ratio": mean["with"]["peak_rss_mb"] / mean["without"]["peak_rss_mb"], "topk": check})
    return results


def report_cache(results: list[dict]) -> str:
    lines = []
    for r in results:
        m = r["mean"]
        lines += [f"{r['title']}: batch {r['batch']}, max length {r['max_length']}, {r['rows']} rows, "
                  f"{r['steps']} timed steps after {r['warmup']}, {r['rounds']} round(s), "
                  f"{torch.get_num_threads()} torch threads",
                  f"  cache write (teacher pass + 1 step): {r['cache_write_s']:.0f} s wall, "
                  f"peak RSS {r['cache_write_rss_mb']:,.0f} MB, {r['cache_mb']:,.1f} MB on disk",
                  f"  without cache: {m['without']['samples_per_s']:.2f} samples/s, "
                  f"peak RSS {m['without']['peak_rss_mb']:,.0f} MB",
                  f"  with cache:    {m['with']['samples_per_s']:.2f} samples/s, "
                  f"peak RSS {m['with']['peak_rss_mb']:,.0f} MB",
                  f"  ratio with/without: samples/s x{r['speed_ratio']:.2f}, peak RSS x{r['rss_ratio']:.2f}"]
        if r["topk"]:
            t = r["topk"]
            lines.append(f"  top-{t['k']} KL / full KL on one batch of the undistilled student: "
                         f"{t['topk_kl']:.4f} / {t['full_kl']:.4f} = {t['topk_kl'] / t['full_kl']:.3f} "
                         f"(teacher's mass outside its top {t['k']}: {t['teacher_tail_mass']:.3f})")
    return "\n".join(lines)


def main() -> None:
    import sys

    if len(sys.argv) == 3 and sys.argv[1] in ("--child", "--topk-check"):
        (child if sys.argv[1] == "--child" else topk_check)(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument("--teacher-cache", action="store_true",
                        help="measure distillation with --teacher-cache against without it instead")
    parser.add_argument("--rounds", type=int, default=1, help="with --teacher-cache: pairs of runs per model")
    parser.add_argument("--models", default="minilm,smollm2", help="with --teacher-cache: minilm, smollm2 or both")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1 (the loop logs its speed at step --warmup)")
    if args.teacher_cache:
        names = args.models.split(",")
        if args.rounds < 1 or any(n not in CACHE_MODELS for n in names):
            parser.error(f"--rounds must be at least 1 and --models a list of {', '.join(CACHE_MODELS)}")
        results = measure_cache(names, args.steps, args.warmup, args.rounds)
        print(json.dumps(results, indent=2) if args.json else report_cache(results))
        return
    numbers = measure(args.steps, args.warmup)
    print(json.dumps(numbers, indent=2) if args.json else report(numbers))


if __name__ == "__main__":
    main()
