"""The fuller recovery table: MiniLM 6 x 12 -> 4 layers, every variant the demo's choices are judged by.

Each row converts all-MiniLM-L6-v2, distils it on rotten-tomatoes-full text (hidden-state MSE through
reshape.json's layer map, the `reshape distill` defaults), fine-tunes it on rotten-tomatoes fresh/rotten
and reports test accuracy (each run's checkpoint picked on the validation split, its test split scored
once, on that checkpoint): the same budgets as examples/minilm_sentiment.py, over several seeds (the seed
drives distillation, fine-tuning and, for --init random, the initial weights). Rows:

- baseline 6 x 12: fine-tuned only;
- 4 x 24, aware head split (the demo), and the same with the contiguous split;
- the control 4 x 12: fewer layers, same heads;
- 4 x 24 with importance selection (Block Influence on review text) instead of uniform;
- 4 x 24 and 4 x 12 without distillation;
- 4 x 24 with --init random: the paper's from-scratch start, then the same recovery;
- ShortGPT's way: 4 x 12 with the layers of lowest Block Influence dropped and the heads unchanged.

With --task-distill (the main job's recipe since task distillation landed), each converted row is trained on
the labels with that seed's fine-tuned baseline as its teacher (`reshape distill --task seq-cls`: cross
entropy + logit KL + hidden states) instead of plain fine-tuning, for the same budget; --lr sets the
fine-tuning rate of both (the main job uses 1e-4).

Before any training it also measures the relative error of the converted models' last hidden states
against the source and against the 4 x 12 control on held-out review text, for both head splits (the
aware one fitted on review text, and on random inputs).
Finished (row, seed) results are kept in OUT/results.json, so a re-run skips them; `--merge` renders the
results.json files of several runs (rows or seeds run in separate processes) as one table. Besides the table it
prints a paired comparison: each row minus the baseline on the same seed, with the mean and spread of the
differences, and each row's mean test accuracy as a fraction of the baseline's.

    python benchmarks/recover.py [--seeds 2] [--distill-steps 150] [--epochs 1] [--lr 5e-5] [--task-distill]
                                 [--rows 1,2,4] [--only-seed 0] [-o benchmarks/recover-out] [--work DIR]
    python benchmarks/recover.py --merge RUN1/results.json RUN2/results.json ...
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import reshape
from reshape.presets import load_presets
from reshape.train.distill import distill
from reshape.train.finetune import finetune
from reshape.train.loop import TrainConfig

console = Console()
ROWS = {
    "baseline 6 x 12": None,
    "4 x 24 aware, distilled": dict(heads=24, head_split="aware"),
    "4 x 24 contiguous, distilled": dict(heads=24, head_split="contiguous"),
    "4 x 12 control, distilled": dict(heads=12),
    "4 x 24 aware, importance selection, distilled": dict(heads=24, select="importance"),
    "4 x 24 aware, not distilled": dict(heads=24, distill=False),
    "4 x 12 control, not distilled": dict(heads=12, distill=False),
    "4 x 24 random init, distilled": dict(heads=24, init="random"),
    # ShortGPT, the way most people remove depth today: drop the layers of lowest Block Influence, heads unchanged
    "4 x 12 ShortGPT (importance selection, heads kept), distilled": dict(heads=12, select="importance"),
}
CALIB = "rotten-tomatoes-full"


def scores(result: dict) -> dict[str, float]:
    return {"validation": result["validation"]["accuracy"], "test": result["test"]["accuracy"]}


def run_row(options: dict | None, seed: int, work: Path, args) -> dict[str, float]:
    finetune_budget = TrainConfig(epochs=args.epochs, batch_size=32, lr=args.lr, seed=seed)
    baseline = work / f"baseline-seed{seed}"  # the fine-tuned baseline: the teacher of --task-distill
    if options is None:
        result = finetune(load_presets()["minilm"].local_folder(), baseline, task="seq-cls", data="rotten-tomatoes",
                          config=finetune_budget, max_length=64, overwrite=True)
        return scores(result)
    options = dict(options)
    distilled = options.pop("distill", True)
    reshape.convert("minilm", work / "converted", depth=4, seed=seed, calib=CALIB, overwrite=True, **options)
    model = work / "converted"
    if distilled:
        distill("minilm", model, work / "distilled", data=CALIB, max_length=64, overwrite=True,
                config=TrainConfig(max_steps=args.distill_steps, batch_size=32, lr=1e-4, seed=seed))
        model = work / "distilled"
    if args.task_distill:
        if not (baseline / "config.json").is_file():
            raise SystemExit(f"--task-distill needs the baseline of seed {seed} first: include row 1 (--rows 1,...)")
        result = distill(baseline, model, work / "finetuned", task="seq-cls", data="rotten-tomatoes",
                         config=finetune_budget, max_length=64, overwrite=True)
    else:
        result = finetune(model, work / "finetuned", task="seq-cls", data="rotten-tomatoes", config=finetune_budget,
                          max_length=64, overwrite=True)
    return scores(result)


@torch.no_grad()
def split_errors() -> dict[str, dict[str, float]]:
    """Relative error of the last hidden states before training, on 256 held-out reviews."""
    from transformers import AutoModel, AutoTokenizer

    from reshape.source import calibration_batches, open_source
    from reshape.train.data import load_data

    folder = load_presets()["minilm"].local_folder()
    source = AutoModel.from_pretrained(folder).eval()
    texts = list(load_data("rotten-tomatoes", task="seq-cls")["validation"]["text"][:256])
    batch = AutoTokenizer.from_pretrained(folder)(texts, padding=True, truncation=True, max_length=64,
                                                  return_tensors="pt")
    mask = batch["attention_mask"].bool()
    calib = calibration_batches(open_source("minilm"), CALIB, source)

    def hidden(model):
        return model.eval()(**batch).last_hidden_state[mask]

    def rel(a, b):
        return round(float((a - b).norm() / b.norm()), 4)

    reference, control = hidden(source), hidden(reshape.leaner(source, 12, 4))
    errors = {"4 x 12 control": {"vs source": rel(control, reference)}}
    for name, split, batches in (("contiguous", "contiguous", None), ("aware, random inputs", "aware", None),
                                 ("aware", "aware", calib)):
        out = hidden(reshape.leaner(source, 24, 4, head_split=split, calib=batches))
        errors[f"4 x 24 {name}"] = {"vs source": rel(out, reference), "vs 4 x 12 control": rel(out, control)}
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--distill-steps", type=int, default=150)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=5e-5, help="fine-tuning learning rate (baseline and rows)")
    parser.add_argument("--task-distill", action="store_true",
                        help="train converted rows on the labels with the fine-tuned baseline as teacher")
    parser.add_argument("--rows", help="comma-separated row numbers to run (1-based); all by default")
    parser.add_argument("--only-seed", type=int, action="append",
                        help="run only this seed (repeatable), e.g. one process per seed on one GPU")
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/recover-out"))
    parser.add_argument("--work", type=Path, help="where the models go (default OUT/work)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="RESULTS_JSON",
                        help="render the table of these runs' results.json files (same settings) together; run nothing")
    args = parser.parse_args()
    if args.merge:
        return render(merged(args.merge))
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    # "selection": the checkpoint is picked on validation and test is scored once (older files picked on test).
    settings = {"distill_steps": args.distill_steps, "epochs": args.epochs, "selection": "validation"}
    if args.lr != 5e-5 or args.task_distill:  # recorded only when set, so older results files still match
        settings.update(lr=args.lr, task_distill=args.task_distill)
    if results.get("settings", settings) != settings:
        raise SystemExit(f"{results_file} holds results of other settings {results['settings']}; use another -o")
    results["settings"] = settings
    if "4 x 24 aware, random inputs" not in results.get("split_errors", {}):  # measured once, before training
        console.rule("relative output error before training")
        results["split_errors"] = split_errors()
        results_file.write_text(json.dumps(results, indent=2))
    chosen = [int(i) for i in args.rows.split(",")] if args.rows else range(1, len(ROWS) + 1)
    accuracy = results.setdefault("accuracy", {})
    for number, (name, options) in enumerate(ROWS.items(), 1):
        for seed in range(args.seeds):
            if number not in chosen or str(seed) in accuracy.get(name, {}) or seed not in (args.only_seed or [seed]):
                continue
            console.rule(f"{name}, seed {seed}")
            accuracy.setdefault(name, {})[str(seed)] = run_row(options, seed, args.work or args.out / "work", args)
            results_file.write_text(json.dumps(results, indent=2))
    render(results)


def merged(files: list[Path]) -> dict:
    """The results of several runs of the same settings (rows or seeds run in separate processes), their
    rows in the table's order; a (row, seed) found twice must hold the same scores."""
    runs = [json.loads(f.read_text()) for f in files]
    if any(run["settings"] != runs[0]["settings"] for run in runs):
        raise SystemExit("these results.json files hold results of different settings: " +
                         "; ".join(f"{f}: {run['settings']}" for f, run in zip(files, runs)))
    accuracy: dict[str, dict] = {}
    for run in runs:
        for name, per_seed in run["accuracy"].items():
            for seed, values in per_seed.items():
                if accuracy.setdefault(name, {}).setdefault(seed, values) != values:
                    raise SystemExit(f"{name}, seed {seed}: two runs give different scores")
    ordered = {name: dict(sorted(accuracy[name].items())) for name in ROWS if name in accuracy}
    return {"settings": runs[0]["settings"], "split_errors": runs[0]["split_errors"], "accuracy": ordered}


def render(results: dict) -> None:
    table = Table(title=f"MiniLM -> 4 layers on Rotten Tomatoes: accuracy, {results['settings']}")
    for column in ("row", "seeds", "validation (mean)", "test (mean ± std)", "test, each seed"):
        table.add_column(column)
    for name, per_seed in results["accuracy"].items():
        test = [v["test"] for v in per_seed.values()]
        spread = statistics.stdev(test) if len(test) > 1 else 0.0
        table.add_row(name, str(len(test)), f"{statistics.mean(v['validation'] for v in per_seed.values()):.3f}",
                      f"{statistics.mean(test):.3f} ± {spread:.3f}", ", ".join(f"{v:.3f}" for v in test))
    console.print(table)
    baseline = results["accuracy"].get("baseline 6 x 12", {})
    paired = Table(title="Paired with the baseline of the same seed: test accuracy difference (row - baseline)")
    for column in ("row", "seeds", "difference (mean ± std)", "each seed", "mean / baseline mean"):
        paired.add_column(column)
    for name, per_seed in results["accuracy"].items():
        seeds = [s for s in per_seed if s in baseline]
        if name == "baseline 6 x 12" or not seeds:
            continue
        diffs = [per_seed[s]["test"] - baseline[s]["test"] for s in seeds]
        ratio = statistics.mean(per_seed[s]["test"] for s in seeds) / statistics.mean(baseline[s]["test"] for s in seeds)
        paired.add_row(name, str(len(seeds)), f"{statistics.mean(diffs):+.4f} ± "
                       f"{statistics.stdev(diffs) if len(diffs) > 1 else 0.0:.4f}",
                       ", ".join(f"{d:+.3f}" for d in diffs), f"{ratio:.1%}")
    console.print(paired)
    errors = Table(title="Relative error of the last hidden states before training (held-out reviews)")
    for column in ("model", "vs source", "vs 4 x 12 control"):
        errors.add_column(column)
    for name, values in results["split_errors"].items():
        control = values.get("vs 4 x 12 control")
        errors.add_row(name, f"{values['vs source']:.4f}", "-" if control is None else f"{control:.4f}")
    console.print(errors)


if __name__ == "__main__":
    main()
