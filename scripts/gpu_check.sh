#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one command: the gpu tests (tests/test_gpu.py), then the bench.
# Each step's output goes to OUTPUT_FOLDER/<step>.log, the bench's figures to OUTPUT_FOLDER/<step>.json
# (11 files at most).
#
#   scripts/gpu_wheels.sh                       # once, on a machine where pip can download
#   scripts/gpu_check.sh OUTPUT_FOLDER [--tiny] [--full-compile] [--steps NAME,NAME...]
#
#   --tiny          tiny random models: a smoke run of a few minutes instead of SD1.5-shaped ones
#   --full-compile  also bench the whole-model compile with CUDA graphs (about 3 more minutes of compiling)
#   --steps         run only these steps (names below), e.g. --steps bench_regional for a second call
#
# Each step stops after STEP_LIMIT_S seconds (default 300; the rest still run), so a call of a fixed length
# brings back what finished. At SD1.5 size the steps take an estimated 1-5 minutes each (not yet timed):
# a 10-minute call should fit --steps gpu_tests,bench_operations,bench_training_steps,bench_eager;
# bench_regional a second one.
#
# Steps: gpu_tests; bench_operations (operations, about kernel launches, of a training step per method: seconds);
# bench_training_steps (the per-sample training step of both stages, SD1.5-shaped, timed per group size 1-8);
# bench_eager (eager steps, channels-last A/B, generation with and without a person, time
# to first images, DreamBooth and DreamBooth-LoRA baselines); bench_regional (regional compilation, and the
# cold start: a fresh process's first personalisation with an empty and a warm compile cache);
# bench_full_compile (--full-compile: the whole-model compile with CUDA graphs).
# A bare GPU machine has torch but not diffusers: the wheels in .gpu/wheels are then installed into a
# temporary folder that only this script's processes see (PYTHONPATH), removed at the end.
# Exit status: 0 when the tests passed and every bench ran, 1 otherwise (the other steps still run).
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTPUT_FOLDER [--tiny] [--full-compile] [--steps NAME,NAME...]}
shift
size=() steps=gpu_tests,bench_operations,bench_training_steps,bench_eager,bench_regional
while [ $# -gt 0 ]; do
  case $1 in
    --tiny) size=(--tiny) ;;
    --full-compile) steps=$steps,bench_full_compile ;;
    --steps) steps=${2:?--steps needs a comma-separated list}; shift ;;
    *) echo "unknown option $1"; exit 2 ;;
  esac
  shift
done
limit=${STEP_LIMIT_S:-300}
out=$(mkdir -p "$out" && cd "$out" && pwd)
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

if ! "$python" -c "import diffusers, bitsandbytes" 2>/dev/null; then
  site=$(mktemp -d)
  trap 'rm -rf "$site"' EXIT
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" .gpu/wheels/*.whl \
    || { echo "diffusers or bitsandbytes is missing and .gpu/wheels could not be installed: run scripts/gpu_wheels.sh first"; exit 1; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU: these checks need one'" || exit 1
"$python" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, \
'on', torch.cuda.get_device_name())"

failed=0
step() {  # step NAME COMMAND...: run it (if asked for, at most $limit s), its output to the screen and OUT/NAME.log
  local name=$1
  shift
  case ",$steps," in *",$name,"*) ;; *) return 0 ;; esac
  echo "== $name: $*"
  local started=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" || { failed=1; echo "== $name FAILED or ran past ${limit} s"; }
  echo "== $name took $((SECONDS - started)) s"
}
bench() {  # bench NAME OPTIONS...: `python -m hdb bench` on the GPU, its figures to OUT/NAME.json
  local name=$1
  shift
  step "$name" "$python" -m hdb bench --device cuda "${size[@]}" "$@" --json "$out/$name.json"
}

step gpu_tests "$python" -m pytest -m gpu -n 0 -rA tests/test_gpu.py
bench bench_operations --count-operations
step bench_training_steps "$python" -m hdb bench-training --step-costs --device cuda --json "$out/bench_training_steps.json"
bench bench_eager --channels-last
bench bench_regional --compile regional --no-baselines --cold-start
bench bench_full_compile --compile full --no-baselines
exit $failed
