#!/usr/bin/env bash
# The flex tree step at 0.76B after the BlockMask change (issue 20, item 7), for a session lent a
# device machine (same wheels as bench/gpu_check.sh: bash bench/gpu_wheels.sh here, then
#   run(command="bash bench/gpu_flex_step.sh", carry=[".whl"], timeout_s=420)).
# Question: does building each micro-batch's BlockMask from the tree's block structure
# (forge.tree.masks.tree_block_layout, O(blocks^2) on the host) instead of flex's
# create_block_mask (all N^2 pairs, on every micro-batch) lift the 0.76B flex tree step's
# efficiency (speedup / tree_token_ratio; bench/results/tree-gpu-wide.json: 0.60 agent_per_call,
# 0.635 grpo, on an H200) towards 0.85?
# 1. python -m bench.flex_mask --device cuda: the two builders, alternated -> flex-mask-gpu.json
# 2. python -m bench.tree --model wide, bf16, flex -> tree-gpu-wide.json (compare with the
#    committed one; rerun the committed baseline in the same session if the card differs).
# Writes both JSON files and their logs under $OUT; commit the JSON under bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh  # $out, and the carried wheels on PYTHONPATH
python3 -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'" || exit 1
timeout $(cap 60) python3 -m bench.flex_mask --device cuda --output "$out/flex-mask-gpu.json" >"$out/flex-mask.txt" 2>&1
mask=$?
tail -c 800 "$out/flex-mask.txt"
timeout $(cap 330) python3 -m bench.tree --device cuda --dtype bfloat16 --attention flex --model wide \
  --output "$out/tree-gpu-wide.json" >"$out/bench-flex-wide.txt" 2>&1
bench=$?
tail -c 1500 "$out/bench-flex-wide.txt"
echo "flex_mask exit $mask, bench exit $bench"
exit $((mask || bench))
