"""The fx path's conversion time against torch.fx.symbolic_trace + one forward of the same model.

    python benchmarks/fx.py [--model pit_ti_224] [--heads 8] [--depth 4] [--keep-head-dim] [--repeats 5]

Both are measured here, alternating run by run so machine load hits both alike; medians are compared.
Target: conversion <= 2x the baseline. The model is timm's PiT (no adapter claims it), random weights.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.fx as fx

import reshape


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="pit_ti_224")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--keep-head-dim", action="store_true", help="widen the attention (Net2Net) instead")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    plan = dict(heads=args.heads, depth=args.depth, keep_head_dim=args.keep_head_dim)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        model(x)  # warm-up: first-call allocations are not the subject
        reshape.leaner(model, **plan)
        base, conv = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fx.symbolic_trace(model)
            model(x)
            base.append(time.perf_counter() - start)
            start = time.perf_counter()
            reshape.leaner(model, **plan)
            conv.append(time.perf_counter() - start)
    b, c = statistics.median(base), statistics.median(conv)
    ratio = c / b
    print(f"symbolic_trace + forward s  {b:.3f}")
    print(f"fx-path conversion s        {c:.3f}")
    print(f"ratio conversion/baseline   {ratio:.2f}")
    print("target                      <= 2")
    print(f"result                      {'PASS' if ratio <= 2 else 'FAIL'}")
    print(f"{args.model}, heads -> {args.heads}{' (head dim kept)' if args.keep_head_dim else ''}, "
          f"depth -> {args.depth}, batch 1 at "
          f"{tuple(x.shape[-2:])}, median of {args.repeats} alternating runs, {torch.get_num_threads()} torch threads")


if __name__ == "__main__":
    main()
