"""The `reshape` command as a real subprocess (offline, no colours, no wrapping) and its two verdicts: ok, or
refused with exactly these one-line problems. The subprocess runs are tests/test_cli_smoke.py's (one per
command) and tests/test_examples.py's; the verdicts also judge the in-process runs of
helpers.cli_in_process.invoke, which have the same returncode, stdout and stderr."""

from __future__ import annotations

import os
import subprocess
import sys

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",  # Hub lookups fail at once instead of retrying
    "TRANSFORMERS_OFFLINE": "1",
    "COLUMNS": "1000",  # rich must not wrap tables or messages (long tmp paths included)
    "NO_COLOR": "1",
    "PYTHONWARNINGS": "ignore",
}
MODULE = [sys.executable, "-m", "reshape.cli"]


def run_cli(*args, command=MODULE) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert not error_lines(result), result.stderr


def assert_refused(result: subprocess.CompletedProcess, *problems: tuple[str, object, list[str]]) -> None:
    """Exit code 2 and exactly these problems, in order: (field, value, fragments of reason and fix)."""
    assert result.returncode == 2, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = error_lines(result)
    assert len(lines) == len(problems), result.stderr
    for line, (field, value, fragments) in zip(lines, problems):
        assert line.startswith(f"error: {field}={value}: "), line
        assert "; " in line, f"no fix after the reason: {line}"
        for fragment in fragments:
            assert fragment in line, f"{fragment!r} not in {line!r}"
