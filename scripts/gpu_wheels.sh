#!/usr/bin/env bash
# Fetch, where pip can download, the wheels a bare GPU machine lacks (it has torch, transformers, peft and
# accelerate, but not diffusers) into .gpu/wheels (git-ignored), for scripts/gpu_check.sh to install there.
set -euo pipefail
cd "$(dirname "$0")/.."
diffusers=$(grep -m1 '^diffusers==' requirements-dev.txt)  # the versions the tests pin
bitsandbytes=$(grep -m1 '^bitsandbytes==' requirements-dev.txt)  # --quantize's (43 MB: the carry holds 64 MiB)
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/wheels "$diffusers" "$bitsandbytes" importlib_metadata
ls .gpu/wheels
