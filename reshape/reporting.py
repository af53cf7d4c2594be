"""`reshape report BASE LEANER`: what the leaner model saves and what it costs, measured side by side.

Every figure is measured on the models themselves: parameters by component from the module tree,
FLOPs by running a forward pass under torch's FlopCounterMode, latency as the median of timed runs
after warm-up, peak tensor memory with torch's MemTracker, conditioning with hooks on real (or random)
inputs, and task quality through `reshape eval` when data is given.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from .conditioning import layer_conditioning, layer_heads
from . import validate
from .errors import Problem, ReshapeError, fail
from .inputs import max_tokens, random_inputs
from .output import locked, output_problems, staged
from .source import load_model, open_source
from .summary import count_params

SCHEMA = 1  # bumped whenever a key of report.json changes meaning


def report(base: str | Path, leaner: str | Path, *, data: str | None = None, task: str | None = None,
           batch_sizes: tuple[int, ...] = (1, 32), seq_len: int = 128, repeats: int = 10, kappa: bool = True,
           out: str | Path | None = None, overwrite: bool = False, progress=None) -> dict:
    """Measure BASE and LEANER (folders, aliases or Hub ids) side by side; write report.json,
    report.md and plots to `out` when given."""
    for field, value in (("base", base), ("leaner", leaner)):
        validate.expect(field, value, (str, os.PathLike), "a folder, alias or Hub id",
                        "save the model with save_pretrained and pass its folder")
    with locked(Path(out)) if out else nullcontext():  # from the first check to the final rename
        problems = output_problems(Path(out), overwrite) if out else []
        if (data is None) != (task is None):
            missing, given = ("task", "data") if task is None else ("data", "task")
            problems.append(Problem(missing, None, f"is needed with --{given}: quality is measured on DATA for TASK",
                                    "pass both --data and --task, or neither"))
        problems += validate.problems(batch_sizes=tuple(batch_sizes), seq_len=seq_len, repeats=repeats)
        if problems:
            raise ReshapeError(problems)
        step = progress or (lambda text: None)
        sources = {"base": open_source(str(base)), "leaner": open_source(str(leaner))}
        families = {name: src.spec.family for name, src in sources.items()}
        if families["base"] is not families["leaner"]:
            raise fail("leaner", leaner,
                       f"is a {families['leaner'].name} model but the base is {families['base'].name}",
                       "compare a model with the one it was converted from")
        family = families["base"]
        models = {}
        for name, src in sources.items():
            step(f"Loading {name}: {src.name}")
            model = load_model(src).eval()
            # Measure in float32; GGUF sources already load as float32 (and transformers refuses .float() on them).
            models[name] = model if next(model.parameters()).dtype == torch.float32 else model.float()
        limit = min(filter(None, (max_tokens(m) for m in models.values())), default=None)
        if limit and seq_len > limit:
            raise fail("seq_len", seq_len, f"exceeds the {limit} positions the models take", f"use at most {limit}")

        result = {"schema": SCHEMA, "base": sources["base"].name, "leaner": sources["leaner"].name,
                  "family": family.name, "threads": torch.get_num_threads(), "seq_len": seq_len,
                  "device": "cuda" if torch.cuda.is_available() else "cpu", "models": {}}
        for name, model in models.items():
            shape = family.shape(sources[name].spec.config)
            entry = {"shape": shape.to_dict(), "params": components(model, family)}
            step(f"Counting FLOPs: {name}")
            entry["flops_per_sample"] = flops(model, _inputs(model, 1, seq_len))
            step(f"Peak memory: {name}")
            entry["memory"] = peak_memory(model, _inputs(model, batch_sizes[-1], seq_len))
            if kappa:
                step(f"Conditioning: {name}")
                entry["conditioning"] = layer_conditioning(model, family, _kappa_batches(sources[name], model, data),
                                                           layer_heads(shape))
            if data:
                from .train.finetune import evaluate

                step(f"Evaluating: {name}")
                entry["quality"] = {split: evaluate(sources[name].name, task=task, data=data, split=split)
                                    for split in ("validation", "test")}
            result["models"][name] = entry
        step("Timing both models, alternating")
        for batch in batch_sizes:
            timed = latency(models, {name: _inputs(m, batch, seq_len) for name, m in models.items()}, repeats)
            for name, timing in timed.items():
                result["models"][name].setdefault("latency", {})[str(batch)] = timing
        result["ratios"] = ratios(result["models"]["base"], result["models"]["leaner"])
        result["notes"] = notes(result)
        if out:
            with staged(Path(out), overwrite) as tmp:
                write(result, tmp)
            owner = Path(out).resolve().parent
            if Path(out).name == "report" and (owner / "reshape.json").is_file():  # LEANER/report: the card shows it
                from .card import write_card

                write_card(owner)
        return result


def components(model: nn.Module, family) -> dict[str, int]:
    """Parameters: total, embeddings, the blocks' attention (projections and per-head tensors) and MLP, the
    rest of the blocks (norms, layer scales, Twins' sub-sampling convolutions), and the rest of the model
    (task head, pooler, final norm). Tied weights count once, in the embeddings."""
    counts = count_params(model, family)
    attention = mlp = blocks = 0
    for block in family.layers(model):
        blocks += sum(p.numel() for p in block.parameters())
        weights = family.block_weights(block)
        attention += sum(_size(block, p.name) for p in (*weights.attn_in, weights.attn_out))
        # per-head parameters inside the block (ConViT's gating, Swin's bias tables) belong to attention too
        own = dict(block.named_parameters())
        attention += sum(own[name].numel() for name in weights.per_head if name in own)
        mlp += sum(_size(block, p.name) for p in (*weights.mlp_in, weights.mlp_out))
    return {**counts, "attention": attention, "mlp": mlp, "block_other": blocks - attention - mlp,
            "head_and_other": counts["total"] - counts["embeddings"] - blocks}


def flops(model: nn.Module, inputs: dict) -> int:
    """Floating-point operations of one forward pass over `inputs`, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    return counter.get_total_flops()


@torch.no_grad()
def latency(models: dict[str, nn.Module], inputs: dict[str, dict], repeats: int, warmup: int = 3) -> dict:
    """Median and quartiles of `repeats` forward passes per model after `warmup` untimed ones. The models
    take turns run by run, so a machine that speeds up or slows down during the measurement (other work,
    clock changes) affects both alike and the ratio stays trustworthy."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = {name: {k: v.to(device) for k, v in batch.items()} for name, batch in inputs.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():
        model.to(device)
    for i in range(warmup + repeats):
        for name, model in models.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(**inputs[name])
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(1000 * (time.perf_counter() - start))
    for model in models.values():
        model.to("cpu")
    result = {}
    for name, values in times.items():
        q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
        batch = len(next(iter(inputs[name].values())))
        result[name] = {"median_ms": round(median, 3), "iqr_ms": [round(q1, 3), round(q3, 3)],
                        "samples_per_s": round(1000 * batch / median, 2)}
    return result


def peak_memory(model: nn.Module, inputs: dict) -> dict:
    """Peak tensor memory (MiB) of one inference pass and of one AdamW training step, tracked by torch."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:  # a private torch tool: report its absence rather than fail
        return {"inference_mib": None, "train_step_mib": None, "note": "torch MemTracker unavailable"}

    def peak(train: bool) -> float:
        tracker = MemTracker()
        optimizer = torch.optim.AdamW(model.parameters()) if train else None
        tracker.track_external(model, *([optimizer] if optimizer else []))
        model.train(train)
        with tracker, torch.set_grad_enabled(train):
            output = model(**inputs)
            if train:
                _first_tensor(output).float().pow(2).mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        model.eval()
        snapshot = tracker.get_tracker_snapshot("peak")
        return round(sum(v["Total"] for v in snapshot.values()) / 2 ** 20, 2)

    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        return {"inference_mib": peak(False), "train_step_mib": peak(True)}
    finally:
        model.load_state_dict(state)  # the training step must not change the model being reported


def ratios(base: dict, leaner: dict) -> dict:
    """leaner / base for every figure the two share."""
    def ratio(a, b):
        return round(b / a, 4) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else None

    result = {f"params.{k}": ratio(v, leaner["params"][k]) for k, v in base["params"].items()}
    result["flops_per_sample"] = ratio(base["flops_per_sample"], leaner["flops_per_sample"])
    for batch, timing in base["latency"].items():
        result[f"latency.{batch}"] = ratio(timing["median_ms"], leaner["latency"][batch]["median_ms"])
    for key in ("inference_mib", "train_step_mib"):
        result[f"memory.{key}"] = ratio(base["memory"][key], leaner["memory"][key])
    for split, scores in base.get("quality", {}).items():
        for key in ("accuracy", "f1", "perplexity"):
            if key in scores:
                result[f"quality.{split}.{key}"] = ratio(scores[key], leaner["quality"][split][key])
    return result


def notes(result: dict) -> list[str]:
    """Plain-language caveats the numbers need."""
    said = []
    r = result["ratios"]
    flop_ratio = r["flops_per_sample"]
    for batch in result["models"]["base"]["latency"]:
        latency_ratio = r[f"latency.{batch}"]
        if not (flop_ratio and latency_ratio) or abs(latency_ratio / flop_ratio - 1) <= 0.15:
            continue
        base_dim = result["models"]["base"]["shape"]["head_dim"]
        leaner_dim = result["models"]["leaner"]["shape"]["head_dim"]
        if latency_ratio > flop_ratio and leaner_dim < base_dim:
            why = f"head dim {base_dim} -> {leaner_dim}: narrower heads use the attention kernels less efficiently"
        elif latency_ratio > flop_ratio:
            why = "time not spent in FLOPs (memory traffic, framework overhead) weighs more in the leaner model"
        else:
            why = "fewer layers also cut per-layer overhead that FLOPs do not count; small batches show it most"
        said.append(f"batch {batch}: latency ratio {latency_ratio:.3f} is more than 15% off the FLOP ratio "
                    f"{flop_ratio:.3f} ({why})")
    if result["models"]["base"].get("conditioning") and "quality" not in result["models"]["base"]:
        said.append("conditioning measured on random inputs (no --data given)")
    return said


def write(result: dict, folder: Path) -> None:
    """report.json, report.md and the plots."""
    (folder / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / "report.md").write_text(markdown(result))
    plot(result, folder)


def markdown(result: dict) -> str:
    rows = ["| figure | base | leaner | leaner / base |", "|---|---:|---:|---:|"]
    for label, base, leaner, ratio in figures(result):
        rows.append(f"| {label} | {base} | {leaner} | {ratio} |")
    text = [f"Savings report: `{result['base']}` vs `{result['leaner']}` ({result['device']}, "
            f"{result['threads']} threads, {result['seq_len']} tokens per sample where text)", "", *rows]
    if result["notes"]:
        text += ["", *[f"- {note}" for note in result["notes"]]]
    return "\n".join(text) + "\n"


def show(result: dict, base_name: str, leaner_name: str, console) -> None:
    """Print the figures as a rich table, titled with what was measured where, and the notes."""
    console.print(terminal_table(result, base_name, leaner_name))
    for note in result["notes"]:
        console.print(f"note: {note}")


def terminal_table(result: dict, base_name: str, leaner_name: str):
    from rich.table import Table

    table = Table(title=f"{base_name} vs {leaner_name} ({result['device']}, {result['threads']} threads, "
                        f"{result['seq_len']} tokens)")
    for column in ("", "base", "leaner", "leaner / base"):
        table.add_column(column, justify="left" if not column else "right")
    for row in figures(result):
        table.add_row(*row)
    return table


def figures(result: dict) -> list[tuple[str, str, str, str]]:
    """(label, base, leaner, ratio) rows shared by the terminal table and the Markdown."""
    base, leaner, r = result["models"]["base"], result["models"]["leaner"], result["ratios"]

    def fmt(value, digits=0):
        if value is None:
            return "-"
        if isinstance(value, list):  # one number per stage of a hierarchical model
            return ",".join(fmt(v, digits) for v in value)
        return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"

    rows = [(label, fmt(base["shape"][key]), fmt(leaner["shape"][key]), "")
            for label, key in (("layers", "layers"), ("heads", "heads"), ("head dim", "head_dim"))]
    for key, value in base["params"].items():
        rows.append((f"parameters: {key.replace('_', ' ')}", fmt(value), fmt(leaner["params"][key]),
                     fmt(r[f"params.{key}"], 3)))
    rows.append(("FLOPs per sample", fmt(base["flops_per_sample"]), fmt(leaner["flops_per_sample"]),
                 fmt(r["flops_per_sample"], 3)))
    for batch, timing in base["latency"].items():
        rows.append((f"latency, batch {batch} (ms, median)", fmt(timing["median_ms"], 1),
                     fmt(leaner["latency"][batch]["median_ms"], 1), fmt(r[f"latency.{batch}"], 3)))
    for key, label in (("inference_mib", "peak memory, inference (MiB)"),
                       ("train_step_mib", "peak memory, training step (MiB)")):
        rows.append((label, fmt(base["memory"][key], 1), fmt(leaner["memory"][key], 1), fmt(r[f"memory.{key}"], 3)))
    for split, scores in base.get("quality", {}).items():
        for key in ("accuracy", "f1", "perplexity"):
            if key in scores:
                rows.append((f"{split} {key}", fmt(scores[key], 4), fmt(leaner["quality"][split][key], 4),
                             fmt(r[f"quality.{split}.{key}"], 3)))
    if base.get("conditioning"):
        median = [statistics.median(c["kappa_median"] for c in m["conditioning"]) for m in (base, leaner)]
        rows.append(("κ, median over layers", fmt(median[0], 1), fmt(median[1], 1), fmt(median[1] / median[0], 3)))
    return rows


def plot(result: dict, folder: Path) -> None:
    """kappa.png (κ per layer, both models) and, with quality, quality_vs_params.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    if models["base"].get("conditioning"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, entry in models.items():
            layers = [c["layer"] for c in entry["conditioning"]]
            ax.plot(layers, [c["kappa_median"] for c in entry["conditioning"]], marker="o",
                    label=f"{name}: {entry['shape']['layers']} x {entry['shape']['heads']}")
        ax.set(xlabel="layer", ylabel="κ (median over samples)", yscale="log", title="Attention conditioning")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "kappa.png", dpi=120)
        plt.close(fig)
    metric = next((k for k in ("accuracy", "perplexity") if k in models["base"].get("quality", {}).get("test", {})),
                  None)
    if metric:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, entry in models.items():
            ax.scatter(entry["params"]["total"], entry["quality"]["test"][metric], label=name)
        ax.set(xlabel="parameters", ylabel=f"test {metric}", title=f"test {metric} vs parameters")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "quality_vs_params.png", dpi=120)
        plt.close(fig)


def _kappa_batches(source, model: nn.Module, data: str | None) -> list[dict]:
    """Real text when data is given (and the model reads text), else random inputs."""
    if data and source.spec.family.library == "transformers" and getattr(model.config, "vocab_size", None):
        from .source import calibration_batches

        return calibration_batches(source, data, model, rows=64)
    return random_inputs(model, batches=2, batch_size=16, tokens=128)


def _inputs(model: nn.Module, batch: int, seq_len: int) -> dict:
    return random_inputs(model, batches=1, batch_size=batch, tokens=seq_len)[0]


def _size(block: nn.Module, name: str) -> int:
    return sum(p.numel() for p in block.get_submodule(name).parameters())


def _first_tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]  # logits or last hidden state
