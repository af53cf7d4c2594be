"""Process setup shared by every test under tests/ (subfolders included): one torch thread, the Hub offline,
no progress bars. Shared helpers live in tests/helpers/ (importable as `helpers`: pythonpath in pyproject.toml)."""

from __future__ import annotations

import os

# One thread per test process (and per subprocess a test starts): the suite runs as 2 workers on 2
# cores, and tiny tensors on oversubscribed cores spin-wait. Measured: tests/families/test_conformance.py took
# 44 s with one thread, and had not finished after 14 minutes with torch's default 2 threads while
# another process kept the cores busy. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import transformers as tf  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the Hub is unreachable here; fail fast instead of retrying
tf.logging.disable_progress_bar()
