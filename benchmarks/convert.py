"""Time and peak memory of `reshape.convert` on a BERT-base-sized model, against a floor.

The floor is what any conversion must at least do: load the model with `from_pretrained` and write
it back with `save_pretrained`. Each run happens in a fresh subprocess so that its peak RSS is its
own; a child that only imports the same modules gives the baseline that is subtracted.

    python benchmarks/convert.py [--repeats 3] [--json]

`--shape tinyllama` measures the streaming conversion (reshape/streaming.py) on a random-weight LLaMA
shaped like TinyLlama-1.1B (22 layers, hidden 2048, 32 heads, 4 KV heads, MLP 5632, vocab 32000, bf16,
1 GB shards; about 2.2 GB written to a temporary folder, plus one output at a time): `reshape convert
SRC -o OUT --heads 64 --depth 15 --select uniform` against `from_pretrained(dtype="auto")` +
`save_pretrained`, each a whole fresh process timed as a user waits for it, alternating, with its peak
RSS from the OS (os.wait4), above that of a process that only imports torch, transformers and reshape.

    python benchmarks/convert.py --shape tinyllama [--repeats 2] [--json]

`--shape llama-7b` writes a random-weight LLaMA-7B shape (32 layers, hidden 4096, 32 heads, 32 KV heads,
MLP 11008, vocab 32000, bf16, 5 GB shards; about 13.5 GB on disk, plus the 9.3 GB output) and runs the
streamed `reshape convert SRC -o OUT --heads 64 --depth 22 --select uniform` once, as a whole process.
Target: peak RSS under 2 GB. No floor here: from_pretrained would need about 14 GB of RAM.

    python benchmarks/convert.py --shape llama-7b
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
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
    return {"repeats": repeats, **summarise(runs, "imports", imports, TIME_TARGET, MEMORY_TARGET)}


def summarise(runs: dict[str, list[dict]], baseline: str, baseline_mib: float, time_target: float,
              memory_target: float) -> dict:
    """Medians of the runs' times, their peaks above the `baseline` process's, and both ratios to the floor."""
    numbers = {f"{baseline}_peak_mib": round(baseline_mib, 1)}
    for task, results in runs.items():
        numbers[f"{task}_seconds"] = round(statistics.median(r["seconds"] for r in results), 3)
        numbers[f"{task}_runs_seconds"] = [round(r["seconds"], 3) for r in results]  # to judge the noise
        numbers[f"{task}_peak_mib"] = round(max(r["peak_mib"] for r in results), 1)
        numbers[f"{task}_peak_above_{baseline}_mib"] = round(numbers[f"{task}_peak_mib"] - baseline_mib, 1)
    numbers["time_ratio"] = round(numbers["convert_seconds"] / numbers["floor_seconds"], 3)
    numbers["memory_ratio"] = round(numbers[f"convert_peak_above_{baseline}_mib"]
                                    / numbers[f"floor_peak_above_{baseline}_mib"], 3)
    numbers["time_pass"] = numbers["time_ratio"] <= time_target
    numbers["memory_pass"] = numbers["memory_ratio"] <= memory_target
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


# --- --shape tinyllama: streaming conversion of a 1.1B decoder, whole processes -----------------------

TINYLLAMA = dict(num_hidden_layers=22, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
                 intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048)
STREAM_TIME_TARGET = 0.75  # convert time / floor time, whole processes
STREAM_MEMORY_TARGET = 0.25  # convert peak / floor peak, both above the interpreter baseline
DISK_NEEDED = 4.6e9  # the 2.2 GB source and one output at a time (the floor rewrites all 2.2 GB)
# The `reshape` console script beside this interpreter, as a user runs it (else the same entry point).
RESHAPE = ([str(Path(sys.executable).with_name("reshape"))] if Path(sys.executable).with_name("reshape").is_file()
           else [sys.executable, "-c", "from reshape.cli import main; main()"])
PROGRAMS = {  # each run is one fresh process; {src} and {out} are filled in
    "baseline": [sys.executable, "-c", "import torch, transformers, reshape"],
    "floor": [sys.executable, "-c", "import sys; from transformers import AutoModelForCausalLM; "
              "AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype='auto').save_pretrained(sys.argv[2])",
              "{src}", "{out}"],
    "convert": [*RESHAPE, "convert", "{src}", "-o", "{out}", "--heads", "64", "--depth", "{depth}", "--select", "uniform",
                "--quiet"],
}


LLAMA_7B = dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
                intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096)
LLAMA_7B_DISK = 24e9  # 13.5 GB source and 9.3 GB output
LLAMA_7B_PEAK_MIB = 2048


def make_tinyllama(folder: str, shard_size: str = "1GB", shape: dict = TINYLLAMA) -> None:
    """Write the checkpoint shard by shard: a 1 GB shard of random bf16 tensors is the most held at once,
    never the model (its tensor names and shapes come from a skeleton on the meta device)."""
    import torch
    from accelerate import init_empty_weights
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    config = LlamaConfig(**shape, dtype="bfloat16", architectures=["LlamaForCausalLM"])
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    meta = {name: t.to(torch.bfloat16) for name, t in model.state_dict().items()}
    split = split_torch_state_dict_into_shards(meta, filename_pattern="model{suffix}.safetensors", max_shard_size=shard_size)
    generator = torch.Generator().manual_seed(0)
    for filename, names in split.filename_to_tensors.items():
        shard = {name: (torch.randn(meta[name].shape, generator=generator) * 0.02).to(torch.bfloat16) for name in names}
        save_file(shard, folder / filename, metadata={"format": "pt"})
        del shard
    config.save_pretrained(folder)
    if not split.is_sharded:
        return
    index = {"metadata": {"total_parameters": sum(t.numel() for t in meta.values()), **split.metadata},
             "weight_map": split.tensor_to_filename}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def run_process(task: str, src: Path, out: Path, depth: int = 15) -> dict:
    """One whole process: wall-clock seconds and its own peak RSS (os.wait4 reports the child's rusage;
    this driver imports no torch, so the child does not inherit a large high-water mark)."""
    shutil.rmtree(out, ignore_errors=True)
    argv = [a.format(src=src, out=out, depth=depth) for a in PROGRAMS[task]]
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"{task} run failed ({process.returncode}):\n{stderr.decode()[-3000:]}")
    if task == "convert" and not (out / "model.safetensors.index.json").is_file():  # the in-memory path writes one file
        sys.exit("convert did not stream (no sharded output); see reshape/streaming.py can_stream")
    shutil.rmtree(out, ignore_errors=True)  # one output on disk at a time
    return {"seconds": seconds, "peak_mib": usage.ru_maxrss / 1024}  # KiB on Linux


def write_source(tmp: Path, shape: str, disk_needed: float) -> float:
    """Check the free disk, write the random checkpoint to tmp/src in a child process; its size in GB."""
    free = shutil.disk_usage(tmp).free
    if free < disk_needed:
        sys.exit(f"{tmp} has {free / 1e9:.1f} GB free; the {shape} benchmark needs {disk_needed / 1e9:.1f} GB "
                 "(set TMPDIR to a folder on a larger disk)")
    (tmp / "src").mkdir()
    subprocess.run([sys.executable, __file__, "--child", shape, str(tmp / "src"), "-"], check=True)
    return sum(p.stat().st_size for p in (tmp / "src").iterdir()) / 1e9


def measure_tinyllama(repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="reshape-bench-") as tmp:
        tmp = Path(tmp)
        source_gb = write_source(tmp, "tinyllama", DISK_NEEDED)
        baseline = max(run_process("baseline", tmp / "src", tmp / "out")["peak_mib"] for _ in range(repeats))
        runs = {"floor": [], "convert": []}
        for _ in range(repeats):  # alternating, so drift in machine load hits both alike
            for task in runs:
                runs[task].append(run_process(task, tmp / "src", tmp / "out"))
    return {"shape": "tinyllama", "repeats": repeats, "source_gb": round(source_gb, 2),
            **summarise(runs, "baseline", baseline, STREAM_TIME_TARGET, STREAM_MEMORY_TARGET)}


def report_tinyllama(n: dict) -> str:
    verdict = {True: "PASS", False: "FAIL"}
    return "\n".join([
        f"TinyLlama-1.1B shape, random bf16, {n['source_gb']:.2f} GB in 1 GB shards -> 64 heads, 15 layers "
        f"(streamed); {n['repeats']} alternating rounds, whole processes",
        f"time: convert {n['convert_seconds']:.2f} s {n['convert_runs_seconds']} vs floor {n['floor_seconds']:.2f} s "
        f"{n['floor_runs_seconds']}: {n['time_ratio']:.2f}x (target <= {STREAM_TIME_TARGET}) {verdict[n['time_pass']]}",
        f"peak RSS above the {n['baseline_peak_mib']:.0f} MiB baseline: convert {n['convert_peak_above_baseline_mib']:.0f} "
        f"MiB vs floor {n['floor_peak_above_baseline_mib']:.0f} MiB: {n['memory_ratio']:.2f}x "
        f"(target <= {STREAM_MEMORY_TARGET}) {verdict[n['memory_pass']]}",
        f"raw peak RSS (MiB): baseline {n['baseline_peak_mib']:.0f}, floor {n['floor_peak_mib']:.0f}, "
        f"convert {n['convert_peak_mib']:.0f}",
    ])


def measure_llama_7b() -> dict:
    with tempfile.TemporaryDirectory(prefix="reshape-bench-") as tmp:
        tmp = Path(tmp)
        source_gb = write_source(tmp, "llama-7b", LLAMA_7B_DISK)
        baseline = run_process("baseline", tmp / "src", tmp / "out")["peak_mib"]
        convert = run_process("convert", tmp / "src", tmp / "out", depth=22)
    return {"shape": "llama-7b", "source_gb": round(source_gb, 2), "baseline_peak_mib": round(baseline),
            "convert_seconds": round(convert["seconds"], 1), "convert_peak_mib": round(convert["peak_mib"]),
            "peak_pass": convert["peak_mib"] < LLAMA_7B_PEAK_MIB}


def report_llama_7b(n: dict) -> str:
    return (f"LLaMA-7B shape, random bf16, {n['source_gb']:.2f} GB in 5 GB shards -> 64 heads, 22 layers (streamed), "
            f"one whole process: {n['convert_seconds']:.1f} s, peak RSS {n['convert_peak_mib']} MiB (the import "
            f"baseline alone {n['baseline_peak_mib']} MiB; target < {LLAMA_7B_PEAK_MIB} MiB) "
            f"{'PASS' if n['peak_pass'] else 'FAIL'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["bert-base", "tinyllama", "llama-7b"], default="bert-base",
                        help="bert-base: reshape.convert in-process against the floor; tinyllama: the streamed "
                             "CLI conversion of a 1.1B decoder, whole processes; llama-7b: its peak memory on a 7B")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default: 3 for bert-base, 2 for tinyllama)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument("--child", nargs=3, metavar=("TASK", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "tinyllama":
            return make_tinyllama(args.child[1])
        if args.child[0] == "llama-7b":
            return make_tinyllama(args.child[1], "5GB", LLAMA_7B)
        return child(*args.child)
    if args.shape == "llama-7b":
        numbers = measure_llama_7b()
        print(json.dumps(numbers, indent=2) if args.json else report_llama_7b(numbers))
        return
    if args.shape == "tinyllama":
        numbers = measure_tinyllama(args.repeats or 2)
        print(json.dumps(numbers, indent=2) if args.json else report_tinyllama(numbers))
        return
    numbers = measure(args.repeats or 3)
    print(json.dumps(numbers, indent=2) if args.json else report(numbers))


if __name__ == "__main__":
    main()
