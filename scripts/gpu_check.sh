#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one command: the gpu tests (tests/test_gpu.py), then the bench at
# SD1.5 size. Logs, the tests' JUnit XML and the bench's JSON go to OUTPUT_FOLDER (at most 8 files).
#
#   scripts/gpu_wheels.sh                       # once, on a machine where pip can download
#   scripts/gpu_check.sh OUTPUT_FOLDER          # on the GPU machine; --tiny: tiny models, a quick smoke run
#
# A bare GPU machine has torch but not diffusers: the wheels in .gpu/wheels are installed into a
# temporary folder that only this script's processes see (PYTHONPATH), and removed at the end.
# Exit status: 0 when the tests passed and every bench ran, 1 otherwise (the other steps still run).
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTPUT_FOLDER [--tiny]}
size=${2:-}
out=$(mkdir -p "$out" && cd "$out" && pwd)
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

if ! "$python" -c "import diffusers" 2>/dev/null; then
  site=$(mktemp -d)
  trap 'rm -rf "$site"' EXIT
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" .gpu/wheels/*.whl \
    || { echo "diffusers is missing and .gpu/wheels could not be installed: run scripts/gpu_wheels.sh first"; exit 1; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU: these checks need one'" || exit 1
"$python" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$out/machine.txt"

failed=0
step() {  # step NAME COMMAND...: run it, its output to the screen and to OUT/NAME.log
  local name=$1; shift
  echo "== $name: $*"
  local started=$SECONDS
  "$@" 2>&1 | tee "$out/$name.log" || { failed=1; echo "== $name FAILED"; }
  echo "== $name took $((SECONDS - started)) s"
}

step gpu_tests "$python" -m pytest -m gpu -n 0 tests/test_gpu.py --junitxml "$out/gpu_tests.xml"
if [ "$size" = "--tiny" ]; then
  step bench_eager "$python" -m hdb bench --device cuda --tiny --json "$out/bench_eager.json"
  step bench_compiled "$python" -m hdb bench --device cuda --tiny --compile --no-baselines \
    --json "$out/bench_compiled.json"
else
  step bench_eager "$python" -m hdb bench --device cuda --json "$out/bench_eager.json"
  step bench_compiled "$python" -m hdb bench --device cuda --compile --no-baselines --json "$out/bench_compiled.json"
fi
exit $failed
