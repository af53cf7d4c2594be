"""The `reshape` command run in this process, and tiny offline models and data to run it on.

Every CLI behaviour test runs the command here (tests/test_cli_smoke.py keeps one real subprocess per
command): a subprocess pays 5-10 s of imports per run. `invoke` gives what a process would: the exit code,
stdout and stderr apart, unwrapped uncoloured output (COLUMNS=1000, NO_COLOR=1, as helpers/cli_subprocess.py
sets), warnings ignored (PYTHONWARNINGS=ignore there), and a crash written to stderr as a traceback with
exit code 1, so `helpers.cli_subprocess.assert_ok` and `assert_refused` judge either kind of run.
"""

from __future__ import annotations

import logging
import os
import random
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers as tf
from typer.testing import CliRunner

WORDS = ["good", "great", "fine", "bad", "awful", "poor"]
POSITIONS = 16  # the tiny models' max_position_embeddings: a --max-length above it is refused


@dataclass
class Run:
    code: int
    output: str  # stdout and stderr, interleaved as printed
    exception: BaseException | None  # what escaped the command (SystemExit for a normal exit)
    stdout: str = ""
    stderr: str = ""

    @property
    def returncode(self) -> int:  # as subprocess.CompletedProcess names it
        return self.code

    @property
    def errors(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith("error: ")]


def invoke(*args, env: dict[str, str | None] | None = None) -> Run:
    """`reshape ARGS` as the console script runs it, with the state one process would start with. `env`
    sets (or, with None, unsets) environment variables for this run only."""
    from accelerate.state import AcceleratorState

    from reshape.cli import app

    AcceleratorState._reset_state(reset_partial_state=True)  # a process sets its precision once; a run here may differ
    root, verbosity = logging.getLogger(), tf.logging.get_verbosity()
    handlers, level = root.handlers[:], root.level
    environ, threads = dict(os.environ), torch.get_num_threads()
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()  # a process's draws are its own
    root.handlers.clear()  # the CLI's basicConfig must bind to this run's stderr, not to an earlier, closed one
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = CliRunner().invoke(app, [str(a) for a in args],
                                        env={"COLUMNS": "1000", "NO_COLOR": "1", **(env or {})})
    finally:  # and what it set (--quiet silences warnings, accelerate's env and state) must not leak into later tests
        root.handlers[:] = handlers
        root.setLevel(level)
        tf.logging.set_verbosity(verbosity)
        if dict(os.environ) != environ:
            os.environ.clear()
            os.environ.update(environ)
        torch.set_num_threads(threads)
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])
        AcceleratorState._reset_state(reset_partial_state=True)
    code, output, stderr, error = result.exit_code, result.output, result.stderr, result.exception
    if error is not None and not isinstance(error, SystemExit):  # a process would print it and exit 1
        crash = "".join(traceback.format_exception(error))
        output, stderr = output + crash, stderr + crash
    return Run(code, output, error, result.stdout, stderr)


def tiny_project(root: Path) -> dict[str, Path]:
    """A tiny BERT teacher with a WordPiece tokenizer, a student converted from it (4 heads, 2 layers), a
    two-class CSV (twice: with its own column names and with guessable ones), a one-class CSV, a text file
    and one of lines longer than the models' positions, all under `root`."""
    import reshape

    tf.logging.set_verbosity_error()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "the", "film", "was", "very"]
    tokenizer = tf.BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})
    torch.manual_seed(0)
    teacher = tf.BertForMaskedLM(tf.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3,
                                               num_attention_heads=2, intermediate_size=64,
                                               max_position_embeddings=POSITIONS))
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    reshape.convert(str(root / "teacher"), root / "student", heads=4, depth=2)
    rows = [f"the film was very {WORDS[i % 6]},{int(i % 6 < 3)}" for i in range(40)]
    (root / "reviews.csv").write_text("review,positive\n" + "\n".join(rows) + "\n")
    (root / "one-class.csv").write_text("review,positive\n" + "\n".join(f"the film was {w},1" for w in WORDS * 4)
                                        + "\n")
    (root / "text.txt").write_text("\n".join(r.split(",")[0] for r in rows) + "\n")
    (root / "labelled.csv").write_text("text,label\n" + "\n".join(rows) + "\n")  # columns found without options
    (root / "long.txt").write_text("\n".join(" ".join(WORDS * 5) for _ in range(20)) + "\n")  # above the positions
    return {name: root / name for name in ("teacher", "student", "reviews.csv", "one-class.csv", "text.txt",
                                           "labelled.csv", "long.txt")}


def left_behind(out: Path) -> list[str]:
    """OUT and anything beside it: a refused run must leave its parent folder as it found it (empty)."""
    return sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []


def tiny_models(root: Path) -> dict[str, Path]:
    """Tiny BERT (4 heads, width 64), GPT-2 (4 heads, width 64) and GQA Llama (4 heads, 2 KV heads), 4 layers
    each, saved under `root`."""
    tf.logging.set_verbosity_error()
    torch.manual_seed(0)
    models = {
        "bert": tf.BertForSequenceClassification(tf.BertConfig(
            hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, vocab_size=100,
            num_labels=2)),
        "gpt2": tf.GPT2LMHeadModel(tf.GPT2Config(
            n_embd=64, n_layer=4, n_head=4, vocab_size=100, bos_token_id=0, eos_token_id=0)),
        "llama": tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, vocab_size=100)),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
    return {name: root / name for name in models}
