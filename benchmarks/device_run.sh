#!/usr/bin/env bash
# Everything issue 18 asks of a GPU machine, in one call, in priority order; each stage has its own
# time limit inside an overall budget, and writes its output to $OUT as it goes:
#   1. benchmarks/gpu_check.py
#   2. bench_vs_comfyui.py on SDXL 1024x1024, 20 steps, with the pack's variants, then a torch.profiler
#      run of 3 SDXL steps for ComfyUI and the pack (ops table + gzipped Chrome traces)
#   3. bench_vs_comfyui.py on SD1.5 512x512, 20 steps
#   4. bench_lora.py --device cuda, if time remains
#
#   bash benchmarks/device_run.sh            # on the GPU machine, from the repository root
#   bash benchmarks/device_run.sh --dry-run  # on a CPU: the same stages at tiny sizes
#
# It needs, in the ignored folder .device/ (carried to the machine; built by
# `python benchmarks/prepare_device.py --comfyui /path/to/ComfyUI`):
#   .device/wheels   diffusers 0.42.1, torchsde 0.2.6, trampoline 0.1.2 (py3-none-any wheels; the
#                    GPU image has torch, transformers, peft, accelerate, safetensors, scipy...)
#   .device/comfyui  the ComfyUI 0.8.0 modules and data files the benchmark imports
#   .device/stubs    an import-only stand-in for PyAV (ComfyUI's video types import it at load)
# Environment: OUT (default ./device_out), PYTHON (python3), BUDGET (s, default 420),
# WORKDIR (checkpoints, default /tmp/bvc_device), ONLY (stage names to run, e.g. "bench_sdxl"; default all).
set -u
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$PWD/device_out}
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-420}
WORKDIR=${WORKDIR:-/tmp/bvc_device}
START=$(date +%s)
mkdir -p "$OUT" "$WORKDIR"
export PYTHONUNBUFFERED=1 DIFFUSERS_ADAPTERS_QUIET=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1

elapsed() { echo $(($(date +%s) - START)); }

# stage NAME LIMIT_S COMMAND...: runs with the smaller of LIMIT_S and the budget left; output to
# $OUT/NAME.txt; prints the lines that carry the results.
stage() {
  local name=$1 limit=$2
  shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
    return
  fi
  local left=$((BUDGET - $(elapsed)))
  if [ "$left" -lt 30 ]; then
    echo "== $name: skipped, ${left} s of the budget left"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s, at $(elapsed) s)"
  local t0
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $(($(date +%s) - t0)) s$([ $rc = 124 ] && echo ' (TIME LIMIT)')"
  # (ComfyUI's KSampler draws a tqdm bar, as in the app: its carriage returns become line breaks here)
  tr '\r' '\n' <"$OUT/$name.txt" | grep -v "it/s\]" |
    grep -E "PASS|FAIL|INFO|SKIP|ratio|^==|^side|^comfyui|^pack|loaded|wrote|dropped|device time|Error|error:" |
    tail -n 45
}

# ---- carried packages (nothing can be downloaded there)
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .device/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import av" 2>/dev/null || export PYTHONPATH=$PYTHONPATH:$PWD/.device/stubs
$PY - <<'EOF'
import importlib.metadata as md, platform
names = "torch diffusers transformers huggingface-hub peft accelerate safetensors torchsde numpy".split()
print("python", platform.python_version(), "|", ", ".join(f"{n} {md.version(n)}" for n in names))
EOF
command -v nvidia-smi >/dev/null && nvidia-smi -L

COMFY=(--comfyui .device/comfyui --workdir "$WORKDIR" --out "$OUT")
if [ $DRY = 1 ]; then
  stage gpu_check 900 $PY benchmarks/gpu_check.py --dry-run --full-size-device none
  stage bench_sdxl 1800 $PY benchmarks/bench_vs_comfyui.py "${COMFY[@]}" --device cpu --families sdxl \
    --size 64 --steps 2 --reps 1 --variants base,keep_cache,no_hook,diffusers_attention --profile 1
  stage bench_sd15 900 $PY benchmarks/bench_vs_comfyui.py "${COMFY[@]}" --device cpu --families sd15 \
    --size 64 --steps 2 --reps 1 --variants base,no_hook
  stage bench_lora 900 $PY benchmarks/bench_lora.py --sizes sd15 --reps 1
else
  stage gpu_check 120 $PY benchmarks/gpu_check.py
  stage gpu_fp16 60 $PY benchmarks/gpu_check.py --full-size-only
  stage bench_sdxl 230 $PY benchmarks/bench_vs_comfyui.py "${COMFY[@]}" --device cuda --families sdxl \
    --reps 6 --time-limit 95 --profile 3 \
    --variants ${SDXL_VARIANTS:-base,cudnn_attn,channels_last,cudnn_benchmark,keep_cache,no_hook,diffusers_attention}
  stage bench_sd15 100 $PY benchmarks/bench_vs_comfyui.py "${COMFY[@]}" --device cuda --families sd15 \
    --reps 6 --time-limit 40 --variants base,channels_last,keep_cache,no_hook,diffusers_attention
  stage bench_lora 150 $PY benchmarks/bench_lora.py --device cuda
fi
FLUX_S=${FLUX_S:-110}; BUDGET=$((BUDGET + FLUX_S)) stage bench_flux_gpu "$FLUX_S" $PY benchmarks/bench_flux_gpu.py --workdir "${FLUX_WORKDIR:-$WORKDIR/flux}" --time-limit $((FLUX_S - 15)) $([ $DRY = 1 ] && echo --dry-run)  # issue 15: own FLUX_S s, FLUX_WORKDIR (29 GB)
# The device tool brings back at most 8 files: the stage logs and profile tables travel as one archive.
(cd "$OUT" && ls ./*.txt >/dev/null 2>&1 && tar czf logs.tar.gz ./*.txt && rm -f ./*.txt)
echo "== done at $(elapsed) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
