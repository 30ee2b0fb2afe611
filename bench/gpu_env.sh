# Sourced by the GPU scripts (bench/gpu_check.sh, bench/gpu_attention.sh), from the repo root:
# sets $out (where results go: $OUT on the device machine) and installs the wheels that
# bench/gpu_wheels.sh fetched into .whl/ (pydantic, datasets, this repo's transformers and peft).
out="${OUT:-bench/results/gpu-check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/forge-site .whl/*.whl \
    || { echo "could not install the wheels in .whl/"; exit 1; }
  export PYTHONPATH="/tmp/forge-site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import pydantic" || { echo "no pydantic: run bench/gpu_wheels.sh here and carry .whl"; exit 1; }
