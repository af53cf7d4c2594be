"""Every example's --smoke mode runs offline to the end and leaves the folders it says it wrote."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.cli_subprocess import ENV

from reshape.train.data import FASHION_MNIST

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # each example runs in its own process, 14-37 s

EXAMPLES = Path(__file__).parent.parent / "examples"


def smoke(script: str, out: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--smoke", "-o", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_glue_smoke(tmp_path):
    done = smoke("glue.py", tmp_path)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["models"]["leaner"]["shape"]["layers"] == 4 and "accuracy" in report["models"]["base"]["quality"]["test"]
    assert "parameters: total" in done.stdout and (tmp_path / "leaner" / "README.md").is_file()


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_imagenet_smoke(tmp_path):
    done = smoke("imagenet.py", tmp_path)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["models"]["leaner"]["shape"]["layers"] == 6 and report["models"]["leaner"]["shape"]["heads"] == 12
    assert "accuracy" in report["models"]["leaner"]["quality"]["test"] and "FLOPs per sample" in done.stdout


def test_tinystories_smoke(tmp_path):
    done = smoke("tinystories.py", tmp_path)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["models"]["leaner"]["shape"] | {"layers": 2, "heads": 8} == report["models"]["leaner"]["shape"]
    assert all(report["models"][m]["quality"]["test"]["perplexity"] > 1 for m in ("base", "leaner"))
    assert "perplexity" in done.stdout
