"""MiniLM (6 layers x 12 heads) -> 4 layers x 24 heads, distilled and fine-tuned on Rotten Tomatoes.

The baseline and the leaner model get the same fine-tuning budget and the same held-out test split:
the baseline is fine-tuned on the labels; the leaner model, first distilled from MiniLM on review text,
is then trained for the same steps on the same labels with the fine-tuned baseline as its teacher
(task-specific distillation). The script prints parameters, test accuracy and CPU latency per batch for
both. Offline, on the real all-MiniLM-L6-v2 weights and real review snippets (see the README).

    python examples/minilm_sentiment.py [--distill-steps 400] [--epochs 2] [--lr 1e-4] [--select importance]
                                        [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.table import Table

import reshape
from reshape.presets import load_presets
from reshape.summary import count_params
from reshape.families import find_family
from reshape.train.distill import distill
from reshape.train.finetune import finetune
from reshape.train.loop import TrainConfig

console = Console()


def latency_ms(folder: Path, batch: int = 32, length: int = 64, repeats: int = 5) -> float:
    """Median CPU time of one forward pass over a batch of `length`-token inputs."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    ids = torch.randint(1000, 2000, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def params(folder: Path) -> dict:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder)
    return count_params(model, find_family(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distill-steps", type=int, default=400)
    parser.add_argument("--epochs", type=float, default=2.0, help="fine-tuning epochs, the same for both models")
    parser.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate, the same for both")
    parser.add_argument("--select", default="uniform", choices=["uniform", "importance"],
                        help="which 4 of the 6 layers stay: evenly spaced, or by Block Influence on review text")
    parser.add_argument("--head-split", default="aware", choices=["aware", "contiguous"],
                        help="how each of the 12 heads becomes two (see reshape/headsplit.py)")
    parser.add_argument("--smoke", action="store_true", help="a few steps of each stage, to check the pipeline")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    # reshape shows its own progress; transformers' bars for each file it loads or saves only add noise
    transformers.logging.disable_progress_bar()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="reshape-demo-"))
    finetune_budget = TrainConfig(epochs=args.epochs, max_steps=3 if args.smoke else None, batch_size=32, lr=args.lr)
    distill_budget = TrainConfig(max_steps=2 if args.smoke else args.distill_steps, batch_size=32, lr=1e-4)
    baseline = load_presets()["minilm"].local_folder()

    console.rule(f"1/5 convert: 6 x 12 -> 4 x 24, {args.select} layer selection, {args.head_split} head split")
    # Review text scores the layers (for --select importance) and fits the aware head split.
    recipe = reshape.convert("minilm", work / "leaner", heads=24, depth=4, select=args.select,
                             head_split=args.head_split, calib="rotten-tomatoes-full", overwrite=True, progress=True)
    console.print(f"kept layers {recipe['plan']['keep']}", recipe.get("layer_scores", ""))
    console.rule(f"2/5 distil from MiniLM on rotten-tomatoes-full text ({distill_budget.max_steps} steps)")
    distill("minilm", work / "leaner", work / "distilled", data="rotten-tomatoes-full", config=distill_budget,
            max_length=64, overwrite=True, progress=True)
    console.rule("3/5 fine-tune the baseline on rotten-tomatoes")
    tuned = finetune(baseline, work / "finetuned-baseline", task="seq-cls", data="rotten-tomatoes",
                     config=finetune_budget, max_length=64, overwrite=True, progress=True)
    console.rule("4/5 train the leaner model on rotten-tomatoes, the fine-tuned baseline as its teacher")
    taught = distill(work / "finetuned-baseline", work / "distilled", work / "finetuned-leaner", task="seq-cls",
                     data="rotten-tomatoes", config=finetune_budget, max_length=64, overwrite=True, progress=True)
    # Each run's checkpoint was picked on the validation split; its test split was scored once, after.
    rows = [("baseline 6 x 12", work / "finetuned-baseline", tuned),
            ("leaner 4 x 24, distilled", work / "finetuned-leaner", taught)]
    console.rule("5/5 measure")
    table = Table(title="MiniLM on Rotten Tomatoes (fresh vs rotten), same fine-tune budget, same test split")
    for column in ("model", "parameters", "without embeddings", "validation accuracy", "test accuracy",
                   "CPU ms / batch of 32 x 64"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for name, folder, result in rows:
        p = params(folder)
        table.add_row(name, f"{p['total']:,}", f"{p['non_embedding']:,}", f"{result['validation']['accuracy']:.3f}",
                      f"{result['test']['accuracy']:.3f}", f"{latency_ms(folder):.0f}")
    console.print(table)
    ratio = rows[1][2]["test"]["accuracy"] / rows[0][2]["test"]["accuracy"]
    console.print(f"leaner / baseline test accuracy: {ratio:.3f}; threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
