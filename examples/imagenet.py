"""timm ViT/DeiT on ImageNet-1k or any image folder: more heads, fewer layers, fine-tuned, with the savings report.

    python examples/imagenet.py [--model deit-base] [--data ILSVRC/imagenet-1k | FOLDER] [--steps 5000]
                                [-o imagenet-run]                                        # needs the Hub
    python examples/imagenet.py --smoke      # offline: a project-made tiny ViT on Fashion-MNIST

Steps: convert MODEL (heads, depth and MLP width from its preset unless given; DeiT-B's preset follows
the paper: 24 heads, 8 layers, MLP 3072 -> 1536) -> fine-tune the baseline and the leaner model on DATA
with the same budget -> report both side by side, with held-out accuracy. Images are recovered by
fine-tuning only: `reshape distill` reads text. ImageNet-1k on the Hub is gated: log in first. The smoke
mode builds the randomly initialised 12 x 3 ViT of examples/fashion_mnist_scratch.py (no pretrained
ViT installs offline) and runs the same steps, two optimizer steps each, on an image folder of 300
Fashion-MNIST images (written as PNG files in class subfolders, as an ImageNet folder is laid out).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

import reshape
from fashion_mnist_scratch import baseline as tiny_vit  # the script's folder is on sys.path
from reshape.reporting import show
from reshape.train.finetune import finetune
from reshape.train.loop import TrainConfig

console = Console()


def smoke_images(folder: Path, per_split: dict[str, int] = {"train": 200, "test": 100}) -> str:
    """Fashion-MNIST images as folder/{train,test}/{class}/{i}.png: a small image folder to smoke-test with."""
    from reshape.train.data import load_data

    data = load_data("fashion-mnist", task="image-cls")
    names = data["train"].features["label"].names
    for split, rows in per_split.items():
        for i, row in enumerate(data[split].select(range(rows))):
            target = folder / split / names[row["label"]].replace("/", "-")
            target.mkdir(parents=True, exist_ok=True)
            row["image"].save(target / f"{i}.png")
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit-base", help="preset alias, timm folder or Hub id")
    parser.add_argument("--data", default="ILSVRC/imagenet-1k", help="Hub dataset or a folder of class subfolders")
    parser.add_argument("--heads", type=int, default=None, help="default: the model's preset")
    parser.add_argument("--depth", type=int, default=None, help="default: the model's preset")
    parser.add_argument("--steps", type=int, default=5000, help="fine-tuning steps of 64 images, for each model")
    parser.add_argument("-o", "--out", type=Path, default=Path("imagenet-run"))
    parser.add_argument("--smoke", action="store_true", help="tiny ViT on Fashion-MNIST, 2 steps per stage")
    args = parser.parse_args()
    work = args.out
    if args.smoke:
        model, data, heads, depth = work / "tiny-vit-12x3", smoke_images(work / "images"), 12, 6
        tiny_vit(model, width=96)
    else:
        model, data, heads, depth = args.model, args.data, args.heads, args.depth
    budget = TrainConfig(max_steps=2 if args.smoke else args.steps, batch_size=64, lr=1e-4)

    console.rule(f"1/4 convert {model}")
    reshape.convert(str(model), work / "converted", heads=heads, depth=depth, overwrite=True)
    for step, (name, folder) in enumerate((("baseline", model), ("leaner", work / "converted")), start=2):
        console.rule(f"{step}/4 fine-tune the {name} on {data}")
        finetune(folder, work / name, task="image-cls", data=data, config=budget, overwrite=True, progress=True)
    console.rule("4/4 savings report")
    result = reshape.report(work / "baseline", work / "leaner", data=data, task="image-cls", out=work / "report",
                            overwrite=True, **({"batch_sizes": (1,), "repeats": 2, "kappa": False}
                                               if args.smoke else {}))
    show(result, f"{model} fine-tuned", "leaner", console)
    console.print(f"Wrote {work}/baseline, {work}/leaner and {work}/report")


if __name__ == "__main__":
    main()
