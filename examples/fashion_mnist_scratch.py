"""The paper's own protocol, small: vision transformers trained from scratch on Fashion-MNIST.

A timm ViT of width --width on 28x28 images cut into 7x7 patches (16 patches and a class token) is the
baseline at depth 12 with 3 heads; `reshape sweep --init random` trains it, the leaner depth 6 with 12
heads, and the control depth 6 with 3 heads, each from a fresh random init with the same budget, over
several seeds, and reports test accuracy (mean ± std) against parameters. Fashion-MNIST comes from the
Debian package dataset-fashion-mnist (60k training and 10k test images).

    python examples/fashion_mnist_scratch.py [--width 96] [--steps 400] [--seeds 3] [-o fashion-sweep] [--smoke]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch

from reshape.families.timm_vit import TIMM_VIT
from reshape.sweep import markdown, sweep

MEAN, STD = 0.286, 0.353  # Fashion-MNIST's pixel mean and standard deviation


def baseline(folder: Path, width: int, seed: int = 0) -> None:
    """Save the randomly initialised 12 x 3 baseline as a timm folder the sweep starts from."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, embed_dim=width,
                              depth=12, num_heads=3, num_classes=10)
    # 28x28 inputs as they are: no resize or crop, Fashion-MNIST's own normalisation (grey copied to RGB).
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 28, 28), "crop_pct": 1.0,
                            "interpolation": "bilinear", "mean": (MEAN,) * 3, "std": (STD,) * 3}
    TIMM_VIT.save(model, None, folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=96, help="embedding width (the paper's tiny ViT uses 192)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per run, batch 128")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("-o", "--out", type=Path, default=Path("fashion-sweep"))
    parser.add_argument("--smoke", action="store_true", help="2 steps, 1 seed: checks the pipeline in seconds")
    args = parser.parse_args()
    steps, seeds = (2, 1) if args.smoke else (args.steps, args.seeds)
    source = args.out / "baseline-12x3"
    if not (source / "config.json").is_file():
        baseline(source, args.width)
    results = sweep(str(source), args.out / "sweep", heads=[12], depths=[6], data="fashion-mnist", task="image-cls",
                    budget=steps, seeds=seeds, init="random", batch_size=128, lr=args.lr, progress=print)
    print(f"Fashion-MNIST from scratch: timm ViT, width {args.width}, 7x7 patches, {steps} steps of 128 images, "
          f"AdamW lr {args.lr}, {seeds} seed(s)")
    print(markdown(results))


if __name__ == "__main__":
    main()
