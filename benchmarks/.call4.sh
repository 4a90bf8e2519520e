bash benchmarks/device_run.sh stage >/dev/null 2>&1; export PYTHONPATH=$PWD/src:$PWD/tests:/tmp/vw-site
T=$(date +%s)
cap() { # name b p g extra...
  local n=$1 b=$2 p=$3 g=$4; shift 4
  timeout 150 python3 -m vramwise.cli bench --random-weights llama-2-13b --quantization int4 --gpu-memory 6GiB --max-num-seqs $b --max-model-len $((p+g)) --batch $b --prompt-len $p --gen-len $g --no-progress --json $OUT/$n.json "$@" > $OUT/$n.log 2>&1
  python3 - $OUT/$n.json $n <<'PY'
import json,sys
d=json.load(open(sys.argv[1])); r=d["results"][0]
print(sys.argv[2], d.get("placement")[:60], "decode", r["decode_tok_s"], "pred", r.get("predicted_decode_tok_s"), "ttft", r["ttft_ms"], "peak", r.get("nvml_peak_mib"))
PY
  echo "  t=$(( $(date +%s)-T ))"
}
cap c16_spread 16 256 128 --kv-cache-dtype int8
cap c16_prefix 16 256 128 --kv-cache-dtype int8 --offload resident:7,streamed:33
cap c1_spread 1 512 128
cap c1_prefix 1 512 128 --offload resident:20,streamed:20
for m in 7b 13b; do timeout 80 python3 benchmarks/profile_decode.py --random-weights llama-2-$m --steps 40 > $OUT/p$m.md 2>&1; grep "wall (median\|idle per\|tokens/s at\|_w4_gemv\|_paged\|_merge" $OUT/p$m.md; done
echo "t=$(( $(date +%s)-T ))"
