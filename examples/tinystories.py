"""Causal LM on TinyStories: more heads, fewer layers, distilled from the original, with the savings report.

    python examples/tinystories.py [--model gpt2] [--steps 3000] [-o tinystories-run]   # needs the Hub
    python examples/tinystories.py --smoke                                              # offline, SmolLM2

Steps: convert MODEL (heads and depth from its preset unless given; GPT-2's preset is the paper's
TinyStories row, 12 x 12 -> 4 x 16) -> distil the converted model from MODEL on the stories (logit KL
and hidden states through the layer map) -> report both side by side, with held-out perplexity. The
smoke mode runs the same steps on SmolLM2 (offline GGUF weights) and Hamlet, two optimizer steps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

import reshape
from reshape.report import show
from reshape.train.distill import distill
from reshape.train.loop import TrainConfig

console = Console()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", help="preset alias, folder or Hub id of a causal LM")
    parser.add_argument("--data", default="roneneldan/TinyStories", help="Hub dataset, text file or recipe")
    parser.add_argument("--heads", type=int, default=None, help="default: the model's preset")
    parser.add_argument("--depth", type=int, default=None, help="default: the model's preset")
    parser.add_argument("--steps", type=int, default=3000, help="distillation steps of 16 x 256 tokens")
    parser.add_argument("-o", "--out", type=Path, default=Path("tinystories-run"))
    parser.add_argument("--smoke", action="store_true", help="SmolLM2 on Hamlet, 2 steps of 2 x 64 tokens")
    args = parser.parse_args()
    model, data = ("smollm2", "hamlet") if args.smoke else (args.model, args.data)
    budget = TrainConfig(max_steps=2 if args.smoke else args.steps, batch_size=2 if args.smoke else 16, lr=1e-4)
    work = args.out

    console.rule(f"1/3 convert {model}")
    reshape.convert(model, work / "converted", heads=args.heads, depth=args.depth, overwrite=True)
    console.rule(f"2/3 distil from {model} on {data}")
    distill(model, work / "converted", work / "leaner", data=data, config=budget,
            max_length=64 if args.smoke else 256, overwrite=True, progress=True)
    console.rule("3/3 savings report")
    result = reshape.report(model, work / "leaner", data=data, task="causal-lm", out=work / "report", overwrite=True,
                            **({"batch_sizes": (1,), "seq_len": 32, "repeats": 2, "kappa": False}
                               if args.smoke else {}))
    show(result, model, "leaner", console)
    console.print(f"Wrote {work}/leaner and {work}/report")


if __name__ == "__main__":
    main()
