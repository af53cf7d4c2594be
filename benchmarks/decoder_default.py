"""Which layers a decoder should lose by default: SmolLM2-135M at 22 of its 30 layers, before any training.

The real SmolLM2-135M (offline GGUF, dequantised once into a plain folder) is cut to 22 layers, heads
unchanged, three ways: `--select uniform` (evenly spread, first and last kept: DistilBERT's rule and the
default for encoders), no `--select` (the default for decoder-only models: Block Influence scored on
random tokens) and `--select importance --calib hamlet` (Block Influence scored on Hamlet's training
text). Each is scored by perplexity on Hamlet's validation and test splits (the contiguous stretches
before and at the end of the play, never used for calibration).

    python benchmarks/decoder_default.py [--depth 22] [-o /tmp/decoder-default]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

import reshape
from reshape.train.finetune import evaluate

console = Console()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=22)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("-o", "--out", type=Path, default=Path("/tmp/decoder-default"))
    args = parser.parse_args()
    teacher = args.out / "teacher"
    if not (teacher / "reshape.json").is_file():
        reshape.convert("smollm2", teacher, heads=9, depth=30, overwrite=True)  # a plain folder of the GGUF

    def perplexity(folder: Path, split: str) -> float:
        return evaluate(folder, task="causal-lm", data="hamlet", max_length=args.max_length, split=split)["perplexity"]

    rows = [("teacher, 30 layers", "-", teacher)]
    for label, select, calib in (("--select uniform", "uniform", None), ("default (importance, random tokens)", None,
                                                                         None),
                                 ("--select importance --calib hamlet", "importance", "hamlet")):
        out = args.out / (select or "default")
        recipe = reshape.convert(teacher, out, heads=9, depth=args.depth, select=select, calib=calib, overwrite=True)
        dropped = [i for i in range(30) if i not in recipe["plan"]["keep"]]
        rows.append((f"{args.depth} layers, {label}", ",".join(map(str, dropped)), out))
    table = Table(title=f"SmolLM2-135M -> {args.depth} of 30 layers, no training: Hamlet perplexity")
    for column in ("model", "dropped layers", "validation", "test"):
        table.add_column(column)
    for name, keep, folder in rows:
        table.add_row(name, keep, f"{perplexity(folder, 'validation'):,.1f}", f"{perplexity(folder, 'test'):,.1f}")
    console.print(table)


if __name__ == "__main__":
    main()
