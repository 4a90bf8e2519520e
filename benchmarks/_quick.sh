bash benchmarks/device_run.sh stage >/dev/null 2>&1; export PYTHONPATH=$PWD/src:$PWD/tests:/tmp/vw-site
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
T0=$(date +%s)
B7="python3 -m vramwise.cli bench --random-weights llama-2-7b --quantization int4 --prompt-len 512 --gen-len 128 --no-progress --max-model-len 640"
B13="python3 -m vramwise.cli bench --random-weights llama-2-13b --quantization int4 --gen-len 128 --no-progress --lm-head-bits 8 --gpu-memory 6GiB"
run() { local name=$1; shift; echo "=== $name [$(( $(date +%s) - T0 ))s]"; "$@" --json $OUT/$name.json 2>&1 | grep -E "^\| [0-9]|rror|placement" | tail -4; }
for step in ${STEPS:-b32g b32s b1 b1all cap1 cap16}; do
case $step in
  b32g) run b32_graphtune $B7 --batch 32 --max-num-seqs 32 --kv-cache-memory 16660MiB ;;
  b32s) VRAMWISE_TUNE_GRAPH=0 run b32_singletune $B7 --batch 32 --max-num-seqs 32 --kv-cache-memory 16660MiB ;;
  b1) run b1 $B7 --batch 1 --max-num-seqs 1 --kv-cache-memory 800MiB ;;
  b1off) VRAMWISE_GEMV_PREFETCH_ALL=0 run b1_pfoff $B7 --batch 1 --max-num-seqs 1 --kv-cache-memory 800MiB ;;
  b13off) VRAMWISE_GEMV_PREFETCH_ALL=0 run b13_b1_pfoff python3 -m vramwise.cli bench --random-weights llama-2-13b --quantization int4 --prompt-len 512 --gen-len 128 --no-progress --max-model-len 640 --batch 1 --max-num-seqs 1 --kv-cache-memory 800MiB ;;
  b1d2) VRAMWISE_GEMV_PREFETCH_DEPTH=2 run b1_d2 $B7 --batch 1 --max-num-seqs 1 --kv-cache-memory 800MiB ;;
  b13d2) VRAMWISE_GEMV_PREFETCH_DEPTH=2 run b13_b1_d2 python3 -m vramwise.cli bench --random-weights llama-2-13b --quantization int4 --prompt-len 512 --gen-len 128 --no-progress --max-model-len 640 --batch 1 --max-num-seqs 1 --kv-cache-memory 800MiB ;;
  b32d2) VRAMWISE_GEMV_PREFETCH_DEPTH=2 run b32_d2 $B7 --batch 32 --max-num-seqs 32 --kv-cache-memory 16660MiB ;;
  b1all) VRAMWISE_KERNEL_AUTOTUNE=all run b1_tuneall $B7 --batch 1 --max-num-seqs 1 --kv-cache-memory 800MiB ;;
  cap1) run cap13_b1 $B13 --batch 1 --prompt-len 512 --max-num-seqs 1 --max-model-len 640 ;;
  cap16) run cap13_b16 $B13 --batch 16 --prompt-len 256 --max-num-seqs 16 --max-model-len 384 --kv-cache-dtype int8 ;;
  a768) VRAMWISE_CONTEXT_ALLOWANCE=768MiB run cap13_b1_a768 $B13 --batch 1 --prompt-len 512 --max-num-seqs 1 --max-model-len 640 ;;
  a384) VRAMWISE_CONTEXT_ALLOWANCE=384MiB run cap13_b1_a384 $B13 --batch 1 --prompt-len 512 --max-num-seqs 1 --max-model-len 640 ;;
  a256x) PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True run cap13_b1_a256x $B13 --batch 1 --prompt-len 512 --max-num-seqs 1 --max-model-len 640 ;;
  a384x) VRAMWISE_CONTEXT_ALLOWANCE=384MiB PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True run cap13_b1_a384x $B13 --batch 1 --prompt-len 512 --max-num-seqs 1 --max-model-len 640 ;;
  x16) PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True run cap13_b16x $B13 --batch 16 --prompt-len 256 --max-num-seqs 16 --max-model-len 384 --kv-cache-dtype int8 ;;
  b13) run b13_b1 python3 -m vramwise.cli bench --random-weights llama-2-13b --quantization int4 --prompt-len 512 --gen-len 128 --no-progress --max-model-len 640 --batch 1 --max-num-seqs 1 --kv-cache-memory 800MiB ;;
  prof32) echo "=== prof32"; python3 benchmarks/profile_decode.py --random-weights llama-2-7b --batch 32 --steps 30 2>&1 | grep -v Warn | head -40 ;;
esac
done
python3 - <<'PY'
import json, glob, os
for f in sorted(glob.glob(os.environ.get("OUT", "/tmp/out") + "/*.json")):
    d = json.load(open(f)); mr = d.get("memory_report") or {}
    r = d["results"][0]
    print(os.path.basename(f), "decode", r["decode_tok_s"], "ttft", r["ttft_ms"], "peak", d.get("nvml_peak_mib"),
          "ctx", mr.get("context_measured"), "->", mr.get("context_after_warmup"), mr.get("placement", "")[:90],
          "pred", r.get("predicted_decode_tok_s"))
PY
echo "total $(( $(date +%s) - T0 ))s"
