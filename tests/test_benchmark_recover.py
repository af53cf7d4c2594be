"""benchmarks/recover.py --merge: results of runs made in separate processes render as one table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "recover.py"
spec = importlib.util.spec_from_file_location("recover_benchmark", SCRIPT)
recover = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recover)
SETTINGS = {"distill_steps": 500, "epochs": 2.0, "selection": "validation"}
ERRORS = {"4 x 12 control": {"vs source": 0.7}}
BASELINE, CONTROL = list(recover.ROWS)[0], list(recover.ROWS)[2]


def results(tmp_path: Path, name: str, accuracy: dict, settings=SETTINGS) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"settings": settings, "split_errors": ERRORS, "accuracy": accuracy}))
    return path


def score(test: float) -> dict:
    return {"validation": test + 0.01, "test": test}


def test_runs_merge_in_the_table_s_row_order_with_their_seeds(tmp_path):
    a = results(tmp_path, "a", {CONTROL: {"1": score(0.7)}, BASELINE: {"0": score(0.8)}})
    b = results(tmp_path, "b", {CONTROL: {"0": score(0.6)}, BASELINE: {"1": score(0.9), "0": score(0.8)}})
    merged = recover.merged([a, b])
    assert list(merged["accuracy"]) == [BASELINE, CONTROL]
    assert merged["accuracy"][CONTROL] == {"0": score(0.6), "1": score(0.7)}
    assert merged["accuracy"][BASELINE] == {"0": score(0.8), "1": score(0.9)}
    assert merged["settings"] == SETTINGS and merged["split_errors"] == ERRORS


def test_other_settings_or_two_scores_for_one_seed_are_refused(tmp_path):
    a = results(tmp_path, "a", {BASELINE: {"0": score(0.8)}})
    other = results(tmp_path, "b", {BASELINE: {"1": score(0.8)}}, {**SETTINGS, "epochs": 1.0})
    with pytest.raises(SystemExit, match="different settings"):
        recover.merged([a, other])
    clash = results(tmp_path, "c", {BASELINE: {"0": score(0.7)}})
    with pytest.raises(SystemExit, match="seed 0: two runs give different scores"):
        recover.merged([a, clash])
