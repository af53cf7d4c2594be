"""SmolLM2-135M (LLaMA with grouped KV heads) -> half the layers, distilled on Hamlet: perplexity before and after.

The teacher is the real SmolLM2-135M from the offline GGUF package, dequantised once into a plain folder
(a no-op conversion). The student keeps 15 of its 30 layers (uniform) and doubles the query heads at the
same head dim (9 -> 18 heads over 3 KV heads, `--keep-head-dim`, which starts function-preserving inside
each kept layer). Perplexity is measured on the held-out last 10% of Hamlet (`reshape eval` on the
"hamlet" recipe) for the teacher, the student before distillation and the student after it.

Distillation matches the teacher's softened logits (KL) and each kept layer's hidden states by cosine:
SmolLM2's hidden states carry a few huge outlier dimensions, so their squared error (~2,000 at the
start) would drown the KL term.

    python benchmarks/recover_lm.py [--steps 40] [--batch-size 4] [--max-length 128] [-o benchmarks/recover-lm-out]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

import reshape
from reshape.train.distill import distill
from reshape.train.finetune import evaluate
from reshape.train.loop import TrainConfig

console = Console()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/recover-lm-out"))
    args = parser.parse_args()
    teacher, student, distilled = args.out / "teacher", args.out / "student", args.out / "distilled"

    console.rule("convert: SmolLM2 GGUF -> plain teacher folder; teacher -> 15 layers x 18 heads")
    if not (teacher / "reshape.json").is_file():
        reshape.convert("smollm2", teacher, heads=9, depth=30, overwrite=True, progress=True)
    recipe = reshape.convert(teacher, student, heads=18, depth=15, keep_head_dim=True, overwrite=True,
                             progress=True)

    def perplexity(folder: Path) -> float:
        return evaluate(folder, task="causal-lm", data="hamlet", max_length=args.max_length)["perplexity"]

    rows = {"teacher 30 x 9": perplexity(teacher), "student 15 x 18, before": perplexity(student)}
    console.rule(f"distil on Hamlet: {args.steps} steps of {args.batch_size} x {args.max_length} tokens")
    result = distill(teacher, student, distilled, data="hamlet", max_length=args.max_length, overwrite=True,
                     hidden_kind="cosine", progress=True,
                     config=TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr))
    rows["student 15 x 18, distilled"] = perplexity(distilled)

    params = recipe["params"]
    table = Table(title="SmolLM2-135M on held-out Hamlet (last 10% of the play), perplexity")
    table.add_column("model")
    table.add_column("parameters", justify="right")
    table.add_column("perplexity", justify="right")
    for name, value in rows.items():
        count = params["source"]["total"] if name.startswith("teacher") else params["result"]["total"]
        table.add_row(name, f"{count:,}", f"{value:.2f}")
    console.print(table)
    (args.out / "results.json").write_text(json.dumps({"perplexity": rows, "params": params,
                                                       "distillation": result["config"]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
