#!/usr/bin/env bash
# The GPU check, as one prepared script for a session lent a device machine (issue 3, item 7):
#   here:  bash bench/gpu_wheels.sh        (the device image lacks pydantic; fetches it as wheels)
#   there: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=560)
# 1. the tests that need CUDA: the flex-attention tree path's logprobs and gradients against
#    separate forwards (fp32), tree packing in bf16 within bf16's own error, and the trainer and
#    the rollout engine on CUDA against CPU (tests/test_device.py), and one FSDP2 process
#    computing in bf16 against the fp32 step (tests/test_distributed.py);
# 2. `python -m bench.tree` in bf16 with flex attention -> tree-gpu.json.
# Writes env.txt, pytest.txt, bench.txt and tree-gpu.json under $OUT (default bench/results/gpu-check);
# commit tree-gpu.json as bench/results/tree-gpu.json.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh  # $out, and the carried wheels on PYTHONPATH
{
  nvidia-smi
  python3 -c "import sys, torch, transformers, peft; print(sys.version); print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__); print(torch.cuda.get_device_name())"
  python3 -m pip list 2>/dev/null | grep -i -E '^(pyarrow|pandas|fsspec|datasets|accelerate|triton|tokenizers|huggingface.hub) '
} >"$out/env.txt" 2>&1
python3 -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'" || exit 1

timeout $(cap 240) python3 -m pytest -q -p no:cacheprovider -m "slow or not slow" -rs -k "gpu or cuda" \
  tests/test_tree_exact.py tests/test_device.py tests/test_distributed.py 2>&1 | tee "$out/pytest.txt"
tests=${PIPESTATUS[0]}

timeout $(cap 300) python3 -m bench.tree --device cuda --dtype bfloat16 --attention flex \
  --output "$out/tree-gpu.json" >"$out/bench.txt" 2>&1
bench=$?
tail -c 3000 "$out/bench.txt"
echo "pytest exit $tests, bench exit $bench"
exit $((tests || bench))
