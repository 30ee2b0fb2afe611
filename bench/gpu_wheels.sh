#!/usr/bin/env bash
# Fetch, here, the wheels bench/gpu_check.sh needs on the device machine. Its image has torch,
# accelerate, pytest and hypothesis, but not pydantic (forge.config), and an older transformers
# (5.17: before the `cache=` rename the rollout engine uses) and peft. regex goes along too:
# transformers 5.24 checks for regex >= 2025.10.22 at import, which the image may predate.
# datasets (with dill and multiprocess, which the image lacks) is what forge.env.tasks imports,
# and test_device's rollout-worker test reaches it; the image's pyarrow and pandas serve it.
# The versions are the ones installed here. Writes .whl/ (git-ignored, about 17 MB); carry it.
# PYTHON_VERSION (default 3.12, the device's) picks the pydantic_core build.
set -euo pipefail
cd "$(dirname "$0")/.."
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "pydantic==$(version pydantic)" "pydantic_core==$(version pydantic_core)" \
  "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)" \
  "transformers==$(version transformers)" "peft==$(version peft)" "regex==$(version regex)" \
  "datasets==$(version datasets)" "dill==$(version dill)" "multiprocess==$(version multiprocess)"
ls .whl
