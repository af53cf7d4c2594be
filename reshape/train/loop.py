"""The training loop, on accelerate: one loop for fine-tuning and distillation.

The caller gives a loss function and, optionally, an evaluation function; the loop owns the rest:
mixed precision where the hardware supports it, gradient accumulation, evaluation every N steps,
best and last checkpoints, exact resume, a rich progress bar and a JSON-lines metrics log. It runs
unchanged under `accelerate launch` (DDP, FSDP2): accelerate shards the data and syncs gradients, and
under FSDP2 the student's weights, gradients and optimizer state too (see start and full_state_dict).

Resume is exact because everything that decides the next step is restored: weights, optimizer,
scheduler and RNG states (accelerate's save_state), and the data order, which a seedable sampler
derives from (seed, epoch) alone, so the interrupted epoch is replayed and its consumed batches skipped.
It starts from the "last" checkpoint, written at every evaluation, every `save_every` steps, at the end,
and on SIGINT or SIGTERM (at the next step boundary); so a `kill -9` loses the steps since the last one.

Text batches are grouped by length: random batches of reviews padded to 52 tokens for a 28-token mean,
and grouping them ran MiniLM fine-tuning ~1.6x faster on CPU for the same examples.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, send_to_device, set_seed
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import get_linear_schedule_with_warmup
from transformers.trainer_pt_utils import LengthGroupedSampler

from .. import validate
from ..errors import Problem, ReshapeError, fail

LossFn = Callable[[nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[nn.Module], dict[str, float]]  # must include "score" (higher is better)
# Model selection reads the validation split only; the test split is scored once, on the selected model.


PRECISIONS = ("auto", "no", "fp16", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when given
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    eval_every: int | None = None  # optimizer steps; None evaluates once, at the end (see patience)
    # With no max_steps: train at least this many steps, in whole epochs (small data gets several passes).
    min_steps: int | None = None
    # Stop once this many evaluations in a row fail to beat the best validation score; without eval_every,
    # evaluate every twentieth of the budget (at least every 10 steps).
    patience: int | None = None
    log_every: int = 10
    # Optimizer steps between "last" checkpoints (also written at every evaluation, at the end and on
    # SIGINT/SIGTERM): what a kill -9 can lose. A MiniLM step at batch 32 takes ~0.7 s on 2 CPU cores
    # (benchmarks/distill.py; 1.5-7 s measured beside other jobs), so 100 steps is 1-5 minutes of work,
    # against ~0.3 s for a save.
    save_every: int = 100
    mixed_precision: str = "auto"  # "auto": bf16 on a CUDA device that supports it, else full precision
    group_by_length: bool = True  # when the caller gives lengths: batches of similar length pad less
    seed: int = 0

    def __post_init__(self):
        # Checked on creation, so the CLI and the Python API refuse the same values before any work starts.
        numbers = {f.name: getattr(self, f.name) for f in fields(self) if f.name in validate.RANGES}
        problems = validate.problems(**numbers)
        if self.mixed_precision not in PRECISIONS:
            problems.append(Problem("mixed_precision", self.mixed_precision, "is not a precision",
                                    f"use one of {', '.join(PRECISIONS)}"))
        if problems:
            raise ReshapeError(problems)

    def fingerprint(self, extra: dict) -> str:
        """Identifies a run, so a checkpoint is only resumed by the run that wrote it."""
        settings = {k: v for k, v in asdict(self).items() if k != "save_every"}  # a resume may save more often
        text = json.dumps({**settings, **extra}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def mixed_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def train(model: nn.Module, loss_fn: LossFn, data: Dataset, collate: Callable, out: Path, config: TrainConfig,
          *, eval_fn: EvalFn | None = None, test_fn: EvalFn | None = None, resume: bool = False,
          run: dict | None = None, lengths: list[int] | None = None, progress: bool = True) -> dict[str, Any]:
    """Train `model` in place; keep checkpoints in out/checkpoints and metrics in out/metrics.jsonl.
    `lengths` (one per example, any unit) lets batches be grouped by length.

    `eval_fn` scores the validation split: every evaluation, and the choice of the best weights (by its
    "score"), which are loaded back into `model` at the end. `test_fn` then scores the test split once,
    on those weights. Returns a summary: steps, "validation" (the selected evaluation, with its step),
    "last_validation" and "test".
    """
    out = Path(out)
    set_seed(config.seed)
    accelerator = start(config)
    # A generator of its own: starting an epoch's iterator must not draw from the global RNG that
    # dropout uses, or a resumed run (which starts its epoch at a different moment) would drift.
    generator = torch.Generator().manual_seed(config.seed)
    # The loader yields rows, collated at the step: accelerate's loader reads one batch ahead, so a collate
    # that draws from the global RNG (masked-LM masking) would draw at another moment in a resumed run.
    if lengths is not None and config.group_by_length:
        sampler = EpochSeededLengthGroupedSampler(lengths, config.batch_size, config.seed)
        loader = DataLoader(data, batch_size=config.batch_size, sampler=sampler, collate_fn=list,
                            generator=generator)
    else:
        loader = DataLoader(data, batch_size=config.batch_size, shuffle=True, collate_fn=list,
                            generator=generator)
    # Prepared first: under `accelerate launch` each process reads its own share of the batches, so an
    # epoch is as many optimizer steps as one process has batches (counting them all made --epochs 1
    # train N epochs on N processes, and a resume skip batches that one process never had).
    loader = accelerator.prepare(loader)
    steps_per_epoch = math.ceil(len(loader) / config.grad_accum)
    total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    if config.min_steps and not config.max_steps and total < config.min_steps:  # whole epochs up to the minimum
        total = math.ceil(config.min_steps / steps_per_epoch) * steps_per_epoch
    eval_every = config.eval_every or (max(10, total // 20) if config.patience and eval_fn else None)
    planned = total
    optimizer = _adamw([p for p in model.parameters() if p.requires_grad], config)
    # Linear warm-up from 0 (the first step's rate is 0; Adam's moments still start there), then linear decay.
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total), total)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    fingerprint = config.fingerprint(run or {})
    checkpoints = out / "checkpoints"
    state = {"step": 0, "fingerprint": fingerprint, "best": None, "last_eval": None, "since_best": 0}
    if resume:
        if accelerator.is_main_process:
            for name in ("best", "last"):
                _finish_swap(checkpoints / name)
        accelerator.wait_for_everyone()
        state = _load_checkpoint(accelerator, checkpoints / "last", fingerprint)
    metrics = out / "metrics.jsonl"
    out.mkdir(parents=True, exist_ok=True)

    def log(record: dict) -> None:
        if accelerator.is_main_process:
            with metrics.open("a") as f:
                f.write(json.dumps({"step": state["step"], **record}) + "\n")

    def evaluate() -> None:
        if eval_fn is None:
            return
        model.eval()
        with torch.no_grad():
            result = eval_fn(accelerator.unwrap_model(model))
        model.train()
        state["last_eval"] = result
        log({"validation": result})
        if state["best"] is None or result["score"] > state["best"]["score"]:
            state["best"] = {**result, "step": state["step"]}
            state["since_best"] = 0
            _save_checkpoint(accelerator, checkpoints / "best", state)
        else:
            state["since_best"] = state.get("since_best", 0) + 1

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} samples/s"),
               TimeRemainingColumn())
    show = progress and accelerator.is_main_process
    model.train()
    interrupted = 0  # the signal that stopped training at a step boundary

    def signalled() -> int:
        caught = signals.caught
        if accelerator.num_processes > 1:  # saving is collective: every process must stop at the same step
            caught = int(accelerator.gather(torch.tensor([caught], device=accelerator.device)).max())
        return caught

    with _StopSignals(speak=accelerator.is_main_process) as signals, \
            Progress(*columns, console=Console(stderr=True), disable=not show) as bar:
        task = bar.add_task("training", total=total, completed=state["step"], loss="-", speed="-")
        epoch = state["step"] // steps_per_epoch
        while state["step"] < total:
            loader.set_epoch(epoch)
            done_in_epoch = (state["step"] - epoch * steps_per_epoch) * config.grad_accum
            batches = accelerator.skip_first_batches(loader, done_in_epoch) if done_in_epoch else loader
            busy, samples, running = 0.0, 0, []  # training time only: evaluation and saving excluded
            for rows in batches:
                batch = send_to_device(collate(rows), accelerator.device)
                started = time.perf_counter()
                with accelerator.accumulate(model):
                    loss, parts = loss_fn(model, batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    optimizer.step()
                    # Once per optimizer step, whatever the number of processes: the schedule counts optimizer
                    # steps (accelerate's default steps it once per process, which ended the linear decay
                    # of an N-process run after 1/N of its steps).
                    if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                        scheduler.step()
                    optimizer.zero_grad()
                samples += _batch_size(batch) * accelerator.num_processes
                running.append(loss.detach().float().item())
                busy += time.perf_counter() - started
                if not accelerator.sync_gradients:
                    continue
                state["step"] += 1
                speed = samples / max(busy, 1e-9)
                bar.update(task, completed=state["step"], loss=f"{sum(running) / len(running):.4f}",
                           speed=f"{speed:.1f}")
                if state["step"] % config.log_every == 0 or state["step"] == total:
                    # The mean over every process's batches (each process sees its own): the loss of the
                    # global batch, as one process with all of them would log it.
                    mean = sum(running) / len(running)
                    if accelerator.num_processes > 1:
                        mean = float(accelerator.reduce(torch.tensor([mean], device=accelerator.device), "mean"))
                    log({"loss": mean, **parts, "lr": scheduler.get_last_lr()[0],
                         "samples_per_s": speed, "epoch": epoch})
                    running = []
                evaluated = bool(eval_every) and state["step"] % eval_every == 0
                if evaluated:
                    evaluate()
                stop = bool(config.patience) and state.get("since_best", 0) >= config.patience
                interrupted = signalled()
                # At every evaluation too: a kill then loses at most --eval-every steps.
                if (state["step"] % config.save_every == 0 or evaluated or state["step"] >= total or stop
                        or interrupted):
                    _save_checkpoint(accelerator, checkpoints / "last", state)
                if interrupted:
                    signals.handled = True
                    break
                if stop:
                    log({"early_stop": f"no better validation score in {config.patience} evaluations"})
                    total = state["step"]
                if state["step"] >= total:
                    break
            if interrupted:
                break
            epoch += 1
    if interrupted:
        error = Interrupted(interrupted, state["step"], checkpoints / "last")
        if accelerator.is_main_process:
            Console(stderr=True).print(str(error), markup=False, highlight=False, soft_wrap=True)
        raise error
    if not eval_every or state["step"] % eval_every:
        evaluate()
    model = accelerator.unwrap_model(model)
    if state["best"] is not None and state["best"]["step"] != state["step"]:
        accelerator.load_state(str(checkpoints / "best"))
    test = None
    if test_fn is not None:
        model.eval()
        with torch.no_grad():
            test = {**test_fn(model), "step": (state["best"] or state)["step"]}
        log({"test": test})
    if accelerator.is_fsdp2:  # FSDP2 leaves the root's weights gathered after a forward: shard them back, or
        from torch.distributed.fsdp import FSDPModule  # changing them in place (a LoRA merge) would change a copy

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
    return {"steps": state["step"], "stopped_early": state["step"] < planned, "validation": state["best"], "last_validation": state["last_eval"],
            "test": test, "fingerprint": fingerprint, "processes": accelerator.num_processes}


def start(config: TrainConfig) -> Accelerator:
    """The Accelerator that `train` runs on, refused when `accelerate launch` would not do what it was asked.
    Callers may start it before `train` (same config) to be refused before they change anything: finetune
    and distill do, once their models are loaded and before anything under OUT changes."""
    accelerator = Accelerator(
        mixed_precision=mixed_precision(config.mixed_precision),
        gradient_accumulation_steps=config.grad_accum,
        step_scheduler_with_optimizer=False,  # train steps it once per optimizer step
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    # Both silent in accelerate 1.15 (docs/guides/recover.md, "Many processes"): FSDP's launcher drops a
    # config's use_cpu, so on a machine without a GPU every process runs alone, and on CPU processes
    # (ACCELERATE_USE_CPU) accelerate turns FSDP on for accelerators only, so the model is replicated (DDP).
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and accelerator.num_processes == 1:
        raise fail("WORLD_SIZE", world, "processes were started, but accelerate runs each alone (no GPU found, "
                   "CPU not requested): each would train the whole run and write the same output folder",
                   "on CPU, set ACCELERATE_USE_CPU=1 in the environment (accelerate's FSDP launcher ignores "
                   "use_cpu in the config); or launch on GPUs")
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if fsdp_asked and accelerator.distributed_type is not DistributedType.FSDP:
        raise fail("distributed_type", "FSDP", f"is ignored by accelerate on {accelerator.distributed_type.value} "
                   "(it shards on GPUs and other accelerators only): every process would hold the whole model",
                   "launch on GPUs, or on CPU drop FSDP and run DDP: ACCELERATE_USE_CPU=1 accelerate launch "
                   "--multi_gpu --num_processes N -m reshape.cli ...")
    if accelerator.distributed_type is DistributedType.FSDP and not accelerator.is_fsdp2:
        raise fail("fsdp_version", accelerator.state.fsdp_plugin.fsdp_version, "is not supported: reshape trains "
                   "and saves under FSDP2 only", "set fsdp_version: 2 in the accelerate config")
    return accelerator


def full_state_dict(model: nn.Module) -> dict | None:
    """The trained weights whole, for save_pretrained(state_dict=...): under FSDP2 every process holds a
    shard of each weight, so every process must call this (it gathers); the first gets the full state dict
    on CPU, the others an empty one. None when the model is not sharded: save_pretrained reads it as it is.

    Every process loads the models in full before `train` shards the student, so accelerate's
    cpu_ram_efficient_loading saves no memory here (and the teacher, never sharded, loads whole on each)."""
    from torch.distributed.fsdp import FSDPModule

    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def is_main_process() -> bool:
    """False in every process but the first under `accelerate launch`: only the first writes outputs."""
    from accelerate import PartialState

    return PartialState().is_main_process


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped order (shuffled, then sorted longest first within runs of up to 50
    batches, the longest batch first), drawn from (seed, epoch) alone: exact resume replays the interrupted
    epoch's order, and the library's sampler, which keeps drawing from one generator, has no set_epoch."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:  # the DataLoader accelerate prepares calls it every epoch
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


def _adamw(params: list, config: TrainConfig) -> torch.optim.Optimizer:
    """Fused AdamW where torch supports it: on 2 CPU cores it cut the optimizer step from 198 to 33 ms
    for MiniLM (benchmarks/distill.py notes); the maths is AdamW's either way."""
    try:
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _batch_size(batch: Any) -> int:
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return len(first)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training at a step boundary, once "last" was saved. A KeyboardInterrupt,
    so that callers stop as they would on Ctrl-C (the CLI exits with code 130)."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"Stopped by {signal.Signals(signum).name} at step {step}; saved {checkpoint}. "
                         "To continue, run the same command with --resume (resume=True in Python).")


class _StopSignals:
    """SIGINT and SIGTERM only set a flag, which the loop reads at the next step boundary, saves "last"
    and stops: stopping in the middle of an optimizer step or of a save leaves nothing consistent to save.
    A second signal stops at once, as a second Ctrl-C should. The previous handlers come back on exit."""

    def __init__(self, speak: bool):
        self.speak, self.caught, self.handled, self.previous = speak, 0, False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python runs handlers there only
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.caught:
            raise KeyboardInterrupt
        self.caught = signum
        if self.speak:  # os.write: a print could re-enter a write that the signal interrupted
            os.write(2, f"\n{signal.Signals(signum).name}: saving the last checkpoint after this step "
                        "(again to stop at once)\n".encode())

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if self.caught and not self.handled:  # it came after the last step boundary: act on it as before
            signal.raise_signal(self.caught)


def _save_checkpoint(accelerator: Accelerator, folder: Path, state: dict) -> None:
    """Write a checkpoint beside the old one and swap it in, so an interruption never leaves a
    half-written checkpoint as the only one: a kill between the swap's two renames leaves the old one
    as `.NAME.old`, which _finish_swap puts back. Every process writes its own RNG state into it."""
    main = accelerator.is_main_process
    tmp, old = folder.parent / f".{folder.name}.tmp", folder.parent / f".{folder.name}.old"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)  # before the others write their RNG states into it
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if main:
        (tmp / "reshape_train_state.json").write_text(json.dumps(state, indent=2))
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)  # left by a kill after an earlier swap
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _finish_swap(folder: Path) -> None:
    """Put back the checkpoint that a kill in the middle of _save_checkpoint's swap left as `.NAME.old`."""
    old = folder.parent / f".{folder.name}.old"
    if not folder.exists() and (old / "reshape_train_state.json").is_file():
        old.rename(folder)


def _load_checkpoint(accelerator: Accelerator, folder: Path, fingerprint: str) -> dict:
    state_file = folder / "reshape_train_state.json"
    if not state_file.is_file():
        raise fail("resume", folder, "has no checkpoint to resume from", "run without --resume to start afresh")
    state = json.loads(state_file.read_text())
    if state.get("fingerprint") != fingerprint:
        raise fail("resume", folder, "is a checkpoint of a different run (model, data or settings differ)",
                   "resume with the same command, or start afresh in another output folder")
    accelerator.load_state(str(folder))
    return state

