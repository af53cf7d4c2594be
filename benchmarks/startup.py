"""Start-up time of the CLI, as whole fresh processes, against two floors timed in the same run.

    python benchmarks/startup.py [--rounds 5]

Commands and floors are run in turn, round after round (alternating, so load changes hit all of them
alike); each gets its median wall time, and the ratios against `python -c pass` and
`python -c "import torch"` are printed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

FLOORS = {"python -c pass": [sys.executable, "-c", "pass"],
          "python -c 'import torch'": [sys.executable, "-c", "import torch"]}
COMMANDS = {
    "reshape --help": [sys.executable, "-m", "reshape.cli", "--help"],
    "reshape convert --help": [sys.executable, "-m", "reshape.cli", "convert", "--help"],
    "reshape presets": [sys.executable, "-m", "reshape.cli", "presets"],
    "reshape inspect bert-base --heads 24 --depth 8": [sys.executable, "-m", "reshape.cli", "inspect", "bert-base",
                                                       "--heads", "24", "--depth", "8"],
    # a local folder (the offline package's copy of all-MiniLM-L6-v2): its config.json, read as JSON
    "reshape inspect minilm --heads 24 --depth 4": [sys.executable, "-m", "reshape.cli", "inspect", "minilm",
                                                    "--heads", "24", "--depth", "4"],
    # a model type only the generic adapter reads: the meta-model path (torch and transformers' modeling code)
    "reshape inspect qwen3-0.6b --heads 32 --depth 19 --keep-head-dim": [
        sys.executable, "-m", "reshape.cli", "inspect", "qwen3-0.6b", "--heads", "32", "--depth", "19",
        "--keep-head-dim"],
}


def wall(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    everything = {**FLOORS, **COMMANDS}
    times: dict[str, list[float]] = {name: [] for name in everything}
    for command in everything.values():  # warm the file cache once
        wall(command)
    for _ in range(args.rounds):
        for name, command in everything.items():
            times[name].append(wall(command))
    median = {name: statistics.median(values) for name, values in times.items()}
    bare, torch_floor = median["python -c pass"], median["python -c 'import torch'"]
    width = max(map(len, median))
    print(f"{'command':{width}s} {'median s':>9s} {'/ python':>9s} {'/ torch':>8s}")
    for name, value in median.items():
        print(f"{name:{width}s} {value:9.2f} {value / bare:9.1f} {value / torch_floor:8.2f}")


if __name__ == "__main__":
    main()
