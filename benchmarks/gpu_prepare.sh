#!/usr/bin/env bash
# Run here, on the CPU machine (registry access), before the one-shot GPU validation: puts into .whl/ (ignored by git;
# the device tool carries it) the wheels the GPU machines lack -- fastwsss itself and omegaconf with its parser
# runtime -- and the commit being validated. The GPU machines bring their own torch, triton, timm and pytest
# (benchmarks/README.md, "One-shot GPU validation").
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python -m pip wheel -q --no-deps --no-build-isolation -w .whl .
python -m pip wheel -q --no-deps -w .whl "omegaconf==2.3.0" "antlr4-python3-runtime==4.9.3"
git rev-parse HEAD > .whl/COMMIT
git diff --quiet HEAD || echo "gpu_prepare: the working tree has uncommitted changes; COMMIT names HEAD" >&2
ls .whl
