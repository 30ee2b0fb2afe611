# Sourced by the GPU scripts (bench/gpu_*.sh), from the repo root: sets $out (where results go:
# $OUT on the device machine), installs the wheels that bench/gpu_wheels.sh fetched into .whl/
# (pydantic, datasets, this repo's transformers and peft; once per machine), and defines
# `cap N`: N seconds, or fewer when bench/gpu_all.sh set a deadline (FORGE_GPU_DEADLINE, epoch
# seconds) that leaves less, so one device call can run every script without being cut off.
out="${OUT:-bench/results/gpu-check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  if [ ! -f /tmp/forge-site/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/forge-site .whl/*.whl \
      || { echo "could not install the wheels in .whl/"; exit 1; }
    touch /tmp/forge-site/.installed
  fi
  export PYTHONPATH="/tmp/forge-site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import pydantic" || { echo "no pydantic: run bench/gpu_wheels.sh here and carry .whl"; exit 1; }
cap() {
  local want=$1
  if [ -n "${FORGE_GPU_DEADLINE:-}" ]; then
    local left=$((FORGE_GPU_DEADLINE - $(date +%s)))
    [ "$left" -lt "$want" ] && want=$left
    [ "$want" -lt 1 ] && want=1
  fi
  echo "$want"
}
