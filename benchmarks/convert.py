"""Time and peak memory of `reshape.convert` on a BERT-base-sized model, against a floor.

The floor is what any conversion must at least do: load the model with `from_pretrained` and write
it back with `save_pretrained`. Each run happens in a fresh subprocess so that its peak RSS is its
own; a child that only imports the same modules gives the baseline that is subtracted.

    python benchmarks/convert.py [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TIME_TARGET = 1.25  # convert time / floor time
MEMORY_TARGET = 1.5  # convert peak / floor peak, both above the import baseline


def child(task: str, src: str, out: str) -> None:
    """One measured run. Imports happen before the timer so only the work is timed."""
    import resource
    import time

    import transformers  # noqa: F401
    from transformers import BertModel

    import reshape

    if task == "source":
        return make_source(src)
    start = time.perf_counter()
    if task == "floor":
        BertModel.from_pretrained(src).save_pretrained(out)
    elif task == "convert":
        reshape.convert(src, out, heads=24, depth=8, progress=False)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"seconds": seconds, "peak_mib": peak_kib / 1024}))


def make_source(folder: str) -> None:
    """A randomly initialised BERT-base (12 layers, 768 wide, 12 heads), saved as safetensors."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig()).save_pretrained(folder)


def run_child(task: str, src: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run([sys.executable, __file__, "--child", task, str(src), str(out)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"{task} run failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="reshape-bench-") as tmp:
        tmp = Path(tmp)
        # Built in a child too: on Linux a child's ru_maxrss starts at its parent's high-water mark
        # (kept across fork and exec), so this process must never hold a model itself.
        subprocess.run([sys.executable, __file__, "--child", "source", str(tmp / "src"), "-"],
                       capture_output=True, check=True)
        # Warm the page cache so the first measured run does not pay for the disk alone.
        run_child("floor", tmp / "src", tmp / "out")
        imports = max(run_child("imports", tmp / "src", tmp / "out")["peak_mib"] for _ in range(repeats))
        runs = {"floor": [], "convert": []}
        for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
            for task in runs:
                runs[task].append(run_child(task, tmp / "src", tmp / "out"))
    numbers = {"repeats": repeats, "imports_peak_mib": round(imports, 1)}
    for task, results in runs.items():
        numbers[f"{task}_seconds"] = round(statistics.median(r["seconds"] for r in results), 3)
        numbers[f"{task}_runs_seconds"] = [round(r["seconds"], 3) for r in results]  # to judge the noise
        numbers[f"{task}_peak_mib"] = round(max(r["peak_mib"] for r in results), 1)
        numbers[f"{task}_peak_above_imports_mib"] = round(numbers[f"{task}_peak_mib"] - imports, 1)
    numbers["time_ratio"] = round(numbers["convert_seconds"] / numbers["floor_seconds"], 3)
    numbers["memory_ratio"] = round(numbers["convert_peak_above_imports_mib"]
                                    / numbers["floor_peak_above_imports_mib"], 3)
    numbers["time_pass"] = numbers["time_ratio"] <= TIME_TARGET
    numbers["memory_pass"] = numbers["memory_ratio"] <= MEMORY_TARGET
    return numbers


def report(n: dict) -> str:
    verdict = {True: "PASS", False: "FAIL"}
    rows = [
        ("", "floor", "convert", "ratio", "target", ""),
        ("time (s, median)", f"{n['floor_seconds']:.2f}", f"{n['convert_seconds']:.2f}",
         f"{n['time_ratio']:.2f}", f"<= {TIME_TARGET}", verdict[n["time_pass"]]),
        ("peak above imports (MiB)", f"{n['floor_peak_above_imports_mib']:.0f}",
         f"{n['convert_peak_above_imports_mib']:.0f}", f"{n['memory_ratio']:.2f}", f"<= {MEMORY_TARGET}",
         verdict[n["memory_pass"]]),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.append(f"BERT-base -> 24 heads, 8 layers; {n['repeats']} repeats; raw peak RSS (MiB): "
                 f"imports {n['imports_peak_mib']:.0f}, floor {n['floor_peak_mib']:.0f}, "
                 f"convert {n['convert_peak_mib']:.0f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument("--child", nargs=3, metavar=("TASK", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    numbers = measure(args.repeats)
    print(json.dumps(numbers, indent=2) if args.json else report(numbers))


if __name__ == "__main__":
    main()
