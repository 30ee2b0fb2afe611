#!/usr/bin/env bash
# The second GPU check, for a session lent a device machine after bench/gpu_check.sh has run
# once (same wheels: bash bench/gpu_wheels.sh here, then
#   run(command="bash bench/gpu_attention.sh", carry=[".whl"], timeout_s=560)).
# Question: on a GPU, at a compute-bound size (bench.tree --model wide, 0.76B, bf16), which
# tree attention path is faster, flex (bench/results/tree-gpu-wide.json: 5.34x agent_per_call,
# 2.61x grpo) or dense (block-sparse SDPA, what trainer.attention: auto picks for a model
# loaded with sdpa, as configs/qwen3-*.yaml do)? A profile of the dense path showed it
# host-bound (bench/results/profile-tree-gpu-dense.json); the flex path's profile is missing.
# Writes, under $OUT: tree-gpu-wide-dense.json (+ bench-dense.txt), profile-flex-tree.json
# (+ profile-flex-tree.txt). Commit the JSON files under bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
timeout $(cap 330) python3 -m bench.tree --device cuda --dtype bfloat16 --attention dense --model wide \
  --output "$out/tree-gpu-wide-dense.json" >"$out/bench-dense.txt" 2>&1
bench=$?
tail -c 1500 "$out/bench-dense.txt"
timeout $(cap 180) python3 -m bench.profile_tree --device cuda --dtype bfloat16 --attention flex --model wide \
  --packings tree --output "$out/profile-flex-tree.json" >"$out/profile-flex-tree.txt" 2>&1
profile=$?
grep -E "^==|Self CUDA time total" "$out/profile-flex-tree.txt"
echo "bench exit $bench, profile exit $profile"
exit $((bench || profile))
