#!/usr/bin/env bash
# Submit a training run to an existing Ray cluster with `ray job submit`.
#
#   RAY_ADDRESS=http://HEAD:8265 launch/submit.sh configs/qwen3-8b-multinode.yaml [key=value ...] [--resume DIR]
#
# The repository is uploaded as the job's working directory (every actor runs from it), and
# the runtime env carries the variables below to the driver and every actor. The cluster's
# Python environment needs Forge's dependencies (pip install -e . on each node's image), or
# set FORGE_PIP=1 to have Ray install them per job from pyproject (slow, needs a package index).
# Extra runtime env entries: FORGE_RUNTIME_ENV_JSON='{"env_vars": {"HF_HOME": "/shared/hf"}}'.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: RAY_ADDRESS=http://HEAD:8265 $0 CONFIG [key=value ...] [--resume RUN_DIR]" >&2
  exit 2
fi
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster dashboard, e.g. http://127.0.0.1:8265}"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

runtime_env="$(python - <<'PY'
import json, os
env = {
    "excludes": ["runs/", ".git/", "**/__pycache__/", "bench/results/", "*.pt", "*.safetensors"],
    "env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"},
}
if os.environ.get("FORGE_PIP") == "1":
    env["pip"] = ["-e", "."]
extra = json.loads(os.environ.get("FORGE_RUNTIME_ENV_JSON") or "{}")
env["env_vars"].update(extra.pop("env_vars", {}))
env.update(extra)
print(json.dumps(env))
PY
)"

exec ray job submit \
  --address "$RAY_ADDRESS" \
  --working-dir "$repo" \
  --runtime-env-json "$runtime_env" \
  ${FORGE_JOB_ID:+--submission-id "$FORGE_JOB_ID"} \
  -- bash launch/job_entrypoint.sh train "$@"
