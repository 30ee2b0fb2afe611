#!/usr/bin/env bash
# Fetch, here, the wheels bench/gpu_check.sh needs on the device machine: its image has torch,
# transformers, peft, accelerate, pytest and hypothesis, but not pydantic (forge.config).
# The versions are the ones installed here. Writes .whl/ (git-ignored); carry it to the run.
set -euo pipefail
cd "$(dirname "$0")/.."
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "pydantic==$(version pydantic)" "pydantic_core==$(version pydantic_core)" \
  "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)"
ls .whl
