#!/usr/bin/env bash
# Every open GPU check in one device call, for a session lent a device machine (15 minutes of
# device time in all, 10 minutes a call):
#   here:  bash bench/gpu_wheels.sh
#   there: run(command="bash bench/gpu_all.sh", carry=[".whl"], timeout_s=600)
# Runs, in this order, each under a share of one deadline (GPU_BUDGET_S, default 560 s; time a
# part leaves unused passes to the next):
#   bench/gpu_families.sh   issue 20 item 7: the matrix's flex forward and backward, fp32 + bf16
#   bench/gpu_generation.sh issue 18 item 5: the engine against generate at 0.5B, batch 8/64/256
#   bench/gpu_flex_step.sh  issue 20 item 7: the 0.76B flex tree step after the BlockMask change
#   bench/gpu_prefix_reuse.sh the engine's cache reuse at 0.5B: where a common start pays on a GPU
#   bench/gpu_attention.sh  dense against flex at 0.76B (only if time is left)
# Every part prints its lines as it goes, so a part cut off at its share still leaves its cases
# so far under $OUT. Writes summary.txt under $OUT with each part's exit status and seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh  # installs the wheels once; the parts find them installed
end=$(($(date +%s) + ${GPU_BUDGET_S:-560}))
parts=(gpu_families gpu_generation gpu_flex_step gpu_prefix_reuse gpu_attention)
weights=(30 35 30 15 0)  # gpu_attention gets only what the others leave
: >"$out/summary.txt"
for i in "${!parts[@]}"; do
  now=$(date +%s)
  rest=0
  for j in $(seq "$i" $((${#parts[@]} - 1))); do rest=$((rest + weights[j])); done
  if [ "$rest" -gt 0 ]; then share=$(((end - now) * weights[i] / rest)); else share=$((end - now)); fi
  if [ "$share" -lt 45 ]; then
    echo "${parts[i]}: skipped (${share} s left)" | tee -a "$out/summary.txt"
    continue
  fi
  echo "== ${parts[i]} (up to ${share} s)"
  FORGE_GPU_DEADLINE=$((now + share)) bash "bench/${parts[i]}.sh"
  echo "${parts[i]}: exit $? in $(($(date +%s) - now)) s of ${share}" | tee -a "$out/summary.txt"
done
cat "$out/summary.txt"
