"""Causal LM on TinyStories: more heads, fewer layers, distilled from the original, with the savings report.

    python examples/tinystories.py [--model gpt2] [--steps 3000] [-o tinystories-run]   # needs the Hub
    python examples/tinystories.py --smoke                                  # offline, a tiny GPT-2, ~1 min

Steps: convert MODEL (heads and depth from its preset unless given; GPT-2's preset is the paper's
TinyStories row, 12 x 12 -> 4 x 16) -> distil the converted model from MODEL on the stories (logit KL
and hidden states through the layer map) -> report both side by side, with held-out perplexity. The
smoke mode checks the same steps offline in about a minute on Hamlet, two optimizer steps, with a tiny
randomly initialised GPT-2 (6 x 4, width 64) that reads SmolLM2's tokenizer: real SmolLM2 weights take
minutes per stage here (benchmarks/recover_lm.py distils the real one).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers
from rich.console import Console

import reshape
from reshape.reporting import show
from reshape.train.distill import distill
from reshape.train.loop import TrainConfig

console = Console()


def tiny_gpt2(folder: Path) -> None:
    """A randomly initialised 6-layer, 4-head GPT-2 with SmolLM2's tokenizer (installed offline), saved."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from reshape.presets import load_presets

    smollm2 = load_presets()["smollm2"]
    tokenizer = AutoTokenizer.from_pretrained(smollm2.local_folder(), gguf_file=smollm2.gguf_file)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=6, n_head=4,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", help="preset alias, folder or Hub id of a causal LM")
    parser.add_argument("--data", default="roneneldan/TinyStories", help="Hub dataset, text file or recipe")
    parser.add_argument("--heads", type=int, default=None, help="default: the model's preset")
    parser.add_argument("--depth", type=int, default=None, help="default: the model's preset")
    parser.add_argument("--steps", type=int, default=3000, help="distillation steps of 16 x 256 tokens")
    parser.add_argument("-o", "--out", type=Path, default=Path("tinystories-run"))
    parser.add_argument("--smoke", action="store_true", help="a tiny GPT-2 on Hamlet, 2 steps of 2 x 64 tokens")
    args = parser.parse_args()
    # reshape shows its own progress; transformers' bars for each file it loads or saves only add noise
    transformers.logging.disable_progress_bar()
    work = args.out
    if args.smoke:
        model, data, heads, depth = str(work / "tiny-gpt2-6x4"), "hamlet", 8, 2
        tiny_gpt2(Path(model))
    else:
        model, data, heads, depth = args.model, args.data, args.heads, args.depth
    budget = TrainConfig(max_steps=2 if args.smoke else args.steps, batch_size=2 if args.smoke else 16, lr=1e-4)

    console.rule(f"1/3 convert {model}")
    reshape.convert(model, work / "converted", heads=heads, depth=depth, overwrite=True)
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
