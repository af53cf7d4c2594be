"""BERT-family on a GLUE task: more heads, fewer layers, distilled and fine-tuned, with the savings report.

    python examples/glue.py [--model bert-base] [--task sst2] [--steps 2000] [-o glue-run]   # needs the Hub
    python examples/glue.py --smoke                                                       # offline, ~1 min

Steps: convert MODEL (heads and depth from its preset unless given) -> distil the converted model on the
task's text -> fine-tune the baseline on the task -> task-distil the leaner model from that fine-tuned
baseline with the same budget -> report both side by side (parameters, FLOPs, latency, memory, accuracy).
Single-sentence GLUE tasks only (sst2, cola): reshape's text tasks read one text column. The smoke mode
runs the same steps on MiniLM and 300 of the offline Rotten Tomatoes reviews (written to a CSV file,
so the local-file path is exercised too), two optimizer steps each.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import transformers
from rich.console import Console

import reshape
from reshape.reporting import show
from reshape.train.distill import distill
from reshape.train.finetune import finetune
from reshape.train.loop import TrainConfig

GLUE_TASKS = {"sst2": "nyu-mll/glue:sst2", "cola": "nyu-mll/glue:cola"}
console = Console()


def smoke_reviews(file: Path, rows: int = 300) -> str:
    """The first `rows` Rotten Tomatoes training reviews as a CSV (text, label): a task small enough to smoke-test."""
    from reshape.train.data import load_data

    reviews = load_data("rotten-tomatoes", task="seq-cls")["train"].select(range(rows))
    file.parent.mkdir(parents=True, exist_ok=True)
    reviews.to_pandas().assign(label=lambda df: df["label"].map(reviews.features["label"].int2str)).to_csv(
        file, index=False)
    return str(file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert-base", help="preset alias, folder or Hub id")
    parser.add_argument("--task", default="sst2", choices=sorted(GLUE_TASKS))
    parser.add_argument("--heads", type=int, default=None, help="default: the model's preset")
    parser.add_argument("--depth", type=int, default=None, help="default: the model's preset")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per training stage, batch 32")
    parser.add_argument("-o", "--out", type=Path, default=Path("glue-run"))
    parser.add_argument("--smoke", action="store_true", help="MiniLM on Rotten Tomatoes, 2 steps per stage")
    args = parser.parse_args()
    # reshape shows its own progress; transformers' bars for each file it loads or saves only add noise
    transformers.logging.disable_progress_bar()
    work = args.out
    model, data = ("minilm", smoke_reviews(work / "reviews.csv")) if args.smoke else (args.model, GLUE_TASKS[args.task])
    budget = TrainConfig(max_steps=2 if args.smoke else args.steps, batch_size=8 if args.smoke else 32, lr=5e-5)

    console.rule(f"1/5 convert {model}")
    reshape.convert(model, work / "converted", heads=args.heads, depth=args.depth, calib=data, overwrite=True)
    console.rule(f"2/5 distil on the text of {data}")
    distill(model, work / "converted", work / "distilled", data=data, config=budget, max_length=128,
            overwrite=True, progress=True)
    console.rule("3/5 fine-tune the baseline")
    finetune(model, work / "baseline", task="seq-cls", data=data, config=budget, overwrite=True, progress=True)
    console.rule("4/5 task-distil the leaner model from the fine-tuned baseline (same budget)")
    distill(work / "baseline", work / "distilled", work / "leaner", data=data, task="seq-cls", config=budget,
            overwrite=True, progress=True)
    console.rule("5/5 savings report")
    result = reshape.report(work / "baseline", work / "leaner", data=data, task="seq-cls", out=work / "report",
                            overwrite=True, **({"batch_sizes": (1,), "seq_len": 32, "repeats": 2, "kappa": False}
                                               if args.smoke else {}))
    show(result, f"{model} fine-tuned", "leaner", console)
    console.print(f"Wrote {work}/baseline, {work}/leaner and {work}/report")


if __name__ == "__main__":
    main()
