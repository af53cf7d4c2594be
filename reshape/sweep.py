"""`reshape sweep`: a heads x depth grid, each point converted, recovered and scored the same way.

Every grid point runs convert -> distil (with --init transfer and distillation data) -> fine-tune -> the
fine-tune's scores, for each seed: validation (which picks each run's checkpoint and the break point)
and test (scored once per run, on the checkpoint picked). The source model itself and, for every depth, the control
"same heads, fewer layers" are always included, so "more heads" and "less capacity" can be told apart.
Each finished (point, seed) is saved as its own small JSON file the moment it ends: a re-run skips it,
and an interruption loses at most the point in progress.

With `teacher_cache`, the first point to distil writes the source model's outputs on the distillation data
there, every layer of them, and every later point (and a re-run) reads them instead of running the source
model again: the points map different teacher layers (reshape.train.teacher_cache).
"""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from . import validate
from .errors import Problem, ReshapeError
from .output import locks_out
from .source import open_source
from .train.loop import TrainConfig


@dataclass(frozen=True)
class Point:
    heads: int | None  # None: the source model, unconverted
    depth: int | None

    @property
    def name(self) -> str:
        return "source" if self.heads is None else f"{self.depth}x{self.heads}"


def grid(source_heads: int, heads: list[int], depths: list[int]) -> list[Point]:
    """The source, then for each depth (deepest first) the control at the source's heads and each asked head count."""
    points = [Point(None, None)]
    for depth in sorted(set(depths), reverse=True):
        for h in [source_heads, *sorted(set(heads) - {source_heads})]:
            points.append(Point(h, depth))
    return points


@locks_out  # two sweeps into one OUT would share its work folder
def sweep(source: str, out: str | Path, *, heads: list[int], depths: list[int], data: str, task: str,
          budget: int, seeds: int = 1, init: str = "transfer", distill_data: str | None = None,
          breaks_below: float = 0.98, batch_size: int = 32, lr: float = 5e-5, max_length: int | None = None,
          teacher_cache: str | Path | None = None, progress=None) -> dict:
    """Run the grid into `out` (resumable) and return the aggregated results."""
    from . import convert, inspect
    from .inputs import max_length_for
    from .train.data import load_data
    from .train.distill import distill
    from .train.finetune import finetune
    from .train.tasks import get_task

    out = Path(out)
    # Everything is checked before the first minute of training is spent and before OUT is made.
    problems = validate.problems(budget=budget, seeds=seeds, breaks_below=breaks_below, batch_size=batch_size, lr=lr,
                                 max_length=max_length)
    problems += [Problem(field, "", "lists nothing", f"list at least one, e.g. --{field} 2")
                 for field, values in (("heads", heads), ("depth", depths)) if not values]
    if teacher_cache is not None and not (distill_data and init == "transfer"):
        problems.append(Problem("teacher_cache", teacher_cache, "is unused: only a sweep that distils (--distill-data "
                                "with --init transfer) runs the teacher", "drop --teacher-cache, or add --distill-data"))
    if problems:
        raise ReshapeError(problems)
    src = open_source(source)
    shape = src.spec.family.shape(src.spec.config)
    points = grid(shape.heads, heads, depths)
    for point in points[1:]:
        inspect(source, point.heads, point.depth, init=init)
    max_length_for(max_length, src.spec.family.build(src.spec, empty=True))  # every point keeps the positions
    get_task(task)
    load_data(data, task=task)
    if distill_data:
        load_data(distill_data, task="embedding")
    settings = {"source": source, "data": data, "task": task, "budget": budget, "init": init,
                "distill_data": distill_data, "batch_size": batch_size, "lr": lr, "max_length": max_length,
                # whether, not where (its top-k KL and bf16 states differ slightly from the teacher's own);
                # only when given, so a sweep begun before the option existed still resumes
                **({"teacher_cache": True} if teacher_cache is not None else {})}
    out.mkdir(parents=True, exist_ok=True)
    settings_file = out / "settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()) != settings:
        raise ReshapeError([Problem("out", out, "holds a sweep with other settings "
                                    f"({settings_file.read_text().strip()[:200]})",
                                    "use another -o, or the same settings")])
    settings_file.write_text(json.dumps(settings, indent=2) + "\n")
    say = progress or (lambda text: None)
    config = TrainConfig(max_steps=budget, batch_size=batch_size, lr=lr)
    for number, point in enumerate(points, 1):
        for seed in range(seeds):
            done = out / "points" / point.name / f"seed{seed}.json"
            if done.is_file():
                continue
            say(f"[{number}/{len(points)}] {point.name}, seed {seed}")
            work = out / "work"
            shutil.rmtree(work, ignore_errors=True)
            model, recipe = src.folder, None
            if point.heads is not None:
                recipe = convert(source, work / "converted", point.heads, point.depth, init=init, seed=seed)
                model = work / "converted"
                if init == "transfer" and distill_data:
                    distill(source, model, work / "distilled", data=distill_data, max_length=max_length,
                            config=replace(config, seed=seed), teacher_cache=teacher_cache,
                            cache_every_layer=True)
                    model = work / "distilled"
            tuned = finetune(model, work / "finetuned", task=task, data=data, max_length=max_length,
                             config=replace(config, seed=seed))
            params = recipe["params"]["result"] if recipe else inspect(source)["source"]["params"]
            record = {"point": point.name, "heads": point.heads or shape.heads, "depth": point.depth or shape.layers,
                      "seed": seed, "params": params, "validation": tuned["validation"], "test": tuned["test"]}
            done.parent.mkdir(parents=True, exist_ok=True)
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=2) + "\n")
            tmp.rename(done)  # a point counts as done only once its file is complete
    shutil.rmtree(out / "work", ignore_errors=True)
    results = aggregate(out, points, breaks_below)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    pareto_plot(results, out / "pareto.png")
    return results


def aggregate(out: Path, points: list[Point], breaks_below: float) -> dict:
    """Mean ± std per point over its seeds, and the first point (in grid order) below the bar."""
    rows = []
    for point in points:
        records = [json.loads(f.read_text()) for f in sorted((out / "points" / point.name).glob("seed*.json"))]
        validation = [r["validation"]["score"] for r in records]
        scores = [r["test"]["score"] for r in records]
        rows.append({"point": point.name, "heads": records[0]["heads"], "depth": records[0]["depth"],
                     "control": point.heads is not None and records[0]["heads"] == rows[0]["heads"],
                     "params": records[0]["params"]["total"], "non_embedding": records[0]["params"]["non_embedding"],
                     "seeds": len(scores), "validation_mean": statistics.mean(validation),
                     "mean": statistics.mean(scores), "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                     "scores": scores})
    # The break point is a choice among models, so it reads validation; "mean"/"std" are test scores.
    baseline = rows[0]["validation_mean"]
    # Scores are "higher is better": accuracy, or minus perplexity, where the bar sits above the baseline.
    bar = breaks_below * baseline if baseline >= 0 else baseline / breaks_below
    breaks = next((row["point"] for row in rows[1:] if row["validation_mean"] < bar), None)
    return {"rows": rows, "breaks_below": breaks_below, "bar": bar, "breaks_at": breaks}


def markdown(results: dict) -> str:
    lines = ["| point | layers x heads | parameters | without embeddings | validation (mean) | test (mean ± std) "
             "| seeds |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        label = row["point"] + (" (control: same heads)" if row["control"] else "")
        lines.append(f"| {label} | {row['depth']} x {row['heads']} | {row['params']:,} | {row['non_embedding']:,} | "
                     f"{row['validation_mean']:.4f} | {row['mean']:.4f} ± {row['std']:.4f} | {row['seeds']} |")
    verdict = (f"First point below {results['breaks_below']:.0%} of the source on validation ({results['bar']:.4f}): "
               f"{results['breaks_at']}" if results["breaks_at"] else
               f"No point fell below {results['breaks_below']:.0%} of the source ({results['bar']:.4f}).")
    return "\n".join([*lines, "", verdict, *_paired(results["rows"])]) + "\n"


def _paired(rows: list[dict]) -> list[str]:
    """Each point's test score minus the source's on the same seed: seeds share data order and budget, so
    the differences vary less than the two means do."""
    source, lines = rows[0]["scores"], []
    for row in rows[1:]:
        diffs = [a - b for a, b in zip(row["scores"], source)]
        if len(diffs) > 1:
            lines.append(f"- {row['point']} - source, paired by seed (test): {statistics.mean(diffs):+.4f} ± "
                         f"{statistics.stdev(diffs):.4f} ({', '.join(f'{d:+.4f}' for d in diffs)})")
    return ["", *lines] if lines else []


def pareto_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in results["rows"]:
        marker = "*" if row["point"] == "source" else ("s" if row["control"] else "o")
        ax.errorbar(row["params"], row["mean"], yerr=row["std"], fmt=marker, capsize=3)
        ax.annotate(row["point"], (row["params"], row["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(results["bar"], linestyle="--", linewidth=1, color="grey")
    ax.set(xlabel="parameters", ylabel="score", title="score vs parameters (square: same-heads control)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
