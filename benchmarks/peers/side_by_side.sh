#!/usr/bin/env bash
# Ours and the peers side by side on one GPU (issue 6, item 3): same Llama-2 shapes (random weights), same
# prompt and generation lengths, same GPU cap; every run's output and a step record go to $OUT/peers, and
# table.py prints one markdown table with the ratios ours/peer.
#
# Scenarios: Llama-2-13B under 6 GiB (batch 1, 512 prompt + 128 generated; 16 sequences of 256 + 128),
#            Llama-2-7B and Llama-2-13B uncapped (batch 1; 13B also 16 sequences).
# Peers:     llama.cpp (vendored in the llama-cpp-python sdist; llama-bench for batch 1, llama-batched-bench
#            for 16 sequences) on random Q4_0 GGUFs, under the cap the largest -ngl whose NVML peak fits;
#            transformers + accelerate fp16 offload; bitsandbytes NF4.  Ours: vramwise bench, int4.
#
# A device call runs at most 600 s and the machine keeps its disk only ~30 s after a call, so the work comes
# in two parts issued back to back (README.md in this folder has the exact calls):
#   part1  build llama-bench + llama-batched-bench (CUDA, sm_90; ~5 min on 16 cores) while the GGUFs are
#          written in the background, then as many llama.cpp runs as fit before the deadline
#   part2  the llama.cpp runs part 1 left (reusing its build and GGUFs when the machine is still warm; the
#          llama phase ends PY_RESERVE_S before the deadline), then ours, accelerate offload and bitsandbytes;
#          on a cold machine the Python steps go first and the build only if enough time is left
# Steps done on this machine are skipped (markers in $SBS_WORK/done); `STEPS=a,b` runs just those steps.
# Nothing here needs the network: the peer software comes in .peer (prepare.sh, run on the CPU machine),
# our dependencies in .wheels.
#
# usage (repo root):  bash benchmarks/peers/side_by_side.sh part1|part2
# env: DEADLINE_S (565)  CAP_MIB (6144)  PY_RESERVE_S (330)  STEPS (all of the part)  VW_COMMIT (for the
#      table header; the device copy has no .git)  OURS_ARGS (extra flags for every vramwise bench run)
#      PEER_DIR (.peer)  SBS_WORK (/tmp/vw-sbs)  OUT (/tmp/out)
set -u
T0=$(date +%s)
PART=${1:-}
case $PART in part1|part2) ;; *) echo "usage: $0 part1|part2   (see the header of this file)" >&2; exit 2 ;; esac
DEADLINE_S=${DEADLINE_S:-565}
CAP_MIB=${CAP_MIB:-6144}
PY_RESERVE_S=${PY_RESERVE_S:-330}
REPO=$PWD
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/out}
W=${SBS_WORK:-/tmp/vw-sbs}
R=$W/res                      # results live on the machine's disk, and are copied to $OUT/peers after each step
PEER=${PEER_DIR:-$REPO/.peer}
L=$W/llama.cpp
BIN=$L/build/bin
MD=$W/models
mkdir -p "$OUT/peers" "$R" "$W/done" "$MD"
export PATH=/usr/local/cuda/bin:$PATH
TABLE="python3 $HERE/table.py"
PHASE_END=$DEADLINE_S          # the current phase's deadline, in seconds since T0

el() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( PHASE_END - $(el) )); }
log() { echo "[$PART $(el)s] $*" | tee -a "$R/log.txt" >&2; }  # stderr: $(...) captures only results
sync_out() { cp -r "$R/." "$OUT/peers/" 2>/dev/null; }
done_() { [ -e "$W/done/$1" ]; }
mark() { touch "$W/done/$1"; }
wanted() { [ -z "${STEPS:-}" ] || [[ ",$STEPS," == *",$1,"* ]]; }
lim() { local l=$(( $(left) - 5 )); [ $l -gt "$1" ] && l=$1; [ $l -lt 10 ] && l=10; echo $l; }  # min(N, time left)
cap_text() { if [ $(( CAP_MIB % 1024 )) -eq 0 ]; then echo "$(( CAP_MIB / 1024 ))GiB"; else echo "${CAP_MIB}MiB"; fi; }

# ---------- device-wide NVML peak (memory.used, MiB, CUDA contexts included) around one process ----------
used_now() { nvidia-smi -i 0 --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1; }
POLL=""
poll_start() { nvidia-smi -i 0 --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$W/poll_$1.log" 2>/dev/null & POLL=$!; }
poll_stop() { sleep 0.2; kill "$POLL" 2>/dev/null; wait "$POLL" 2>/dev/null; sort -n "$W/poll_$1.log" | tail -1; }

# measure TAG LIMIT_S CMD...: stdout -> $R/TAG.out, stderr -> $R/TAG.err; sets RC PEAK IDLE WALL
measure() {
  local tag=$1 limit=$2; shift 2
  IDLE=$(used_now); poll_start "$tag"
  local t1; t1=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$R/$tag.out" 2> "$R/$tag.err"
  RC=$?
  PEAK=$(poll_stop "$tag"); PEAK=${PEAK:-}
  WALL=$(( $(date +%s) - t1 ))
  echo "$tag rc=$RC peak=${PEAK}MiB idle=${IDLE}MiB wall=${WALL}s: $*" >> "$R/commands.txt"
  log "$tag rc=$RC peak=${PEAK}MiB wall=${WALL}s"
  [ "$RC" -ne 0 ] && tail -3 "$R/$tag.err" | sed 's/^/    /' | tee -a "$R/log.txt" >&2
  return 0
}

# record STEP SETUP RESULT_FILE: the step record table.py reads (uses RC PEAK IDLE WALL of the last measure)
record() {
  local note=""; [ "$RC" -ne 0 ] && note=$(grep -v '^\s*$' "$R/$1.err" 2>/dev/null | tail -1 | cut -c1-200)
  # shellcheck disable=SC2046
  $TABLE record "$R" --step "$1" $(scenario_args "$1") --setup "$2" --result "$3" --rc "$RC" \
    --peak-mib "${PEAK:-}" --idle-mib "${IDLE:-}" --wall-s "${WALL:-}" --note "$note" > /dev/null
  sync_out
}
skip() {  # STEP REASON: not run (a later run of the step supersedes this record)
  log "skip $1 ($2; $(left)s left)"
  # shellcheck disable=SC2046
  [ -e "$R/$1.step.json" ] || $TABLE record "$R" --step "$1" $(scenario_args "$1") --skipped --note "$2" > /dev/null
  sync_out
}

# The scenario of each step: ENGINE FORMAT SHAPE CAP BATCH PROMPT GEN (CAP 0 = uncapped)
scenario() {
  case $1 in
    llama_ref_7b_b1)     echo "llama.cpp llama-bench 7b 0 1 512 128" ;;
    llama_ref_13b_b1)    echo "llama.cpp llama-bench 13b 0 1 512 128" ;;
    llama_cap_13b_b1|llama_fit_13b_b1) echo "llama.cpp llama-bench 13b $CAP_MIB 1 512 128" ;;
    llama_ref_13b_b16)   echo "llama.cpp llama-batched-bench 13b 0 16 256 128" ;;
    llama_cap_13b_b16)   echo "llama.cpp llama-batched-bench 13b $CAP_MIB 16 256 128" ;;
    ours_cap_13b_b1)     echo "vramwise vramwise 13b $CAP_MIB 1 512 128" ;;
    ours_cap_13b_b1_kv8) echo "vramwise vramwise 13b $CAP_MIB 1 512 128" ;;
    ours_cap_13b_b16)    echo "vramwise vramwise 13b $CAP_MIB 16 256 128" ;;
    ours_13b_b1)         echo "vramwise vramwise 13b 0 1 512 128" ;;
    ours_13b_b16)        echo "vramwise vramwise 13b 0 16 256 128" ;;
    ours_7b_b1)          echo "vramwise vramwise 7b 0 1 512 128" ;;
    ours_7b_b32)         echo "vramwise vramwise 7b 0 32 512 128" ;;
    ours_7b_b1_eager)    echo "vramwise vramwise 7b 0 1 512 128" ;;
    hf_offload_13b_cap)  echo "transformers+accelerate hf-peers 13b $CAP_MIB 1 512 ${OFFLOAD_TOKENS:-6}" ;;
    bnb_nf4_13b_cap)     echo "bitsandbytes hf-peers 13b $CAP_MIB 1 512 128" ;;
    bnb_nf4_7b)          echo "bitsandbytes hf-peers 7b 0 1 512 128" ;;
    bnb_nf4_13b)         echo "bitsandbytes hf-peers 13b 0 1 512 128" ;;
    hf_fp16_13b)         echo "transformers hf-peers 13b 0 1 512 128" ;;
    *) return 1 ;;
  esac
}
scenario_args() {
  local e f sh c b p g; read -r e f sh c b p g <<< "$(scenario "$1")"
  echo "--engine $e --format $f --shape $sh --cap-mib $c --batch $b --prompt-len $p --gen-len $g"
}

env_txt() {
  [ -s "$R/env.txt" ] && return
  {
    echo "gpu=$(nvidia-smi -i 0 --query-gpu=name --format=csv,noheader 2>/dev/null)"
    echo "driver=$(nvidia-smi -i 0 --query-gpu=driver_version --format=csv,noheader 2>/dev/null)"
    echo "cpus=$(nproc)"
    echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "commit=${VW_COMMIT:-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    echo "torch=$(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null)"
    echo "cap_mib=$CAP_MIB"
    echo "peers=llama.cpp from $(head -1 "$PEER/VERSIONS" 2>/dev/null || echo '?')"
  } > "$R/env.txt"
}

# ======================================= llama.cpp ========================================================
GENPID=""
gguf_bg() {  # write the missing GGUFs (7b first: the first runs use it) in the background
  ( for m in 7b 13b; do
      [ -s "$MD/$m.gguf" ] && continue
      PYTHONPATH=$L/gguf-py nice -n 5 python3 "$HERE/make_gguf.py" "$m" "$MD/$m.gguf.part" \
        "$L/models/ggml-vocab-llama-spm.gguf" >> "$R/gguf.txt" 2>&1 && mv "$MD/$m.gguf.part" "$MD/$m.gguf"
    done ) &
  GENPID=$!
}
gguf_ready() {  # SHAPE: wait for the background writer (no run overlaps it), write it here if still missing
  [ -n "$GENPID" ] && { wait "$GENPID" 2>/dev/null; GENPID=""; }
  [ -s "$MD/$1.gguf" ] && return 0
  PYTHONPATH=$L/gguf-py python3 "$HERE/make_gguf.py" "$1" "$MD/$1.gguf.part" "$L/models/ggml-vocab-llama-spm.gguf" \
    >> "$R/gguf.txt" 2>&1 && mv "$MD/$1.gguf.part" "$MD/$1.gguf"
  [ -s "$MD/$1.gguf" ] || { log "no $1.gguf (see gguf.txt)"; return 1; }
}
built() { [ -x "$BIN/llama-bench" ] && [ -x "$BIN/llama-batched-bench" ]; }
build() {
  built && { [ -s "$MD/13b.gguf" ] || gguf_bg; return 0; }
  [ -f "$PEER/llama.cpp-src.tar.xz" ] || { log "no $PEER/llama.cpp-src.tar.xz: run benchmarks/peers/prepare.sh and carry .peer"; return 1; }
  [ -f "$L/CMakeLists.txt" ] || tar xJf "$PEER/llama.cpp-src.tar.xz" -C "$W" || return 1
  gguf_bg
  if [ ! -f "$L/build/CMakeCache.txt" ]; then
    log "configure llama.cpp"
    local gen=Ninja; command -v ninja > /dev/null || gen="Unix Makefiles"
    cmake -S "$L" -B "$L/build" -G "$gen" -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
      -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF > "$R/cmake.txt" 2>&1 \
      || { log "configure failed"; tail -20 "$R/cmake.txt" | tee -a "$R/log.txt"; rm -f "$L/build/CMakeCache.txt"; return 1; }
  fi
  local t=$(( $(left) - 15 )); [ $t -lt 30 ] && { log "no time to build ($(left)s left)"; return 1; }
  log "build llama-bench + llama-batched-bench (-j$(nproc), at most ${t}s; an interrupted build resumes)"
  timeout "$t" nice -n 10 cmake --build "$L/build" --target llama-bench llama-batched-bench -j"$(nproc)" > "$R/build.txt" 2>&1
  built || { log "build not finished"; tail -5 "$R/build.txt" | tee -a "$R/log.txt"; sync_out; return 1; }
  log "build done"; sync_out
}

# llama-bench (batch 1): TAG SHAPE LIMIT ARGS...
lb() { local tag=$1 m=$2 lim=$3; shift 3; measure "$tag" "$lim" "$BIN/llama-bench" -m "$MD/$m.gguf" -fa on -o jsonl "$@"; }
# llama-batched-bench: TAG LIMIT ARGS... (13B; -kvu: one KV buffer of exactly 16 x 384 cells shared by the sequences)
lbb() { local tag=$1 lim=$2; shift 2
  measure "$tag" "$lim" "$BIN/llama-batched-bench" -m "$MD/13b.gguf" -fa on -kvu --output-format jsonl "$@"
  if [ "$RC" -eq 139 ]; then  # a segfault in the CPU backend's repacked (AMX) matmul was seen once: retry without
    log "$tag: segfault, retrying with --no-repack"
    measure "$tag" "$lim" "$BIN/llama-batched-bench" -m "$MD/13b.gguf" -fa on -kvu --output-format jsonl "$@" -nr
  fi; }
peak_ok() { [ "$RC" -eq 0 ] && [ -n "$PEAK" ] && [ "$PEAK" -ge 100 ]; }  # a run that failed, or a poller that saw nothing, is not a fit

# Largest -ngl (of 41: output layer + 40 blocks) whose probe peak <= CAP_MIB. SEED: the rig's answer on an
# H100 (two probes confirm it: SEED fits, SEED+1 does not); PER_MIB: GPU MiB one more block adds, for the jumps.
# probe function KIND NGL -> prints the peak (99999 = failed), cached per machine in $W/probe_KIND_NGL
probe() {
  local f=$W/probe_$1_$2; [ -s "$f" ] && { cat "$f"; return; }
  if [ "$1" = b1 ]; then lb "probe_b1_ngl$2" 13b "$(lim 60)" -ngl "$2" -p 512 -n 16 -r 1  # same 768-cell KV as -n 128
  else lbb "probe_b16_ngl$2" "$(lim 90)" -ctk q8_0 -ctv q8_0 -c 6144 -ngl "$2" -npp 376 -ntg 8 -npl 16; fi  # fills all 6144 cells
  if peak_ok; then echo "$PEAK" > "$f"; else echo 99999 > "$f"; fi
  cat "$f"
}
search_ngl() {  # KIND SEED PER_MIB -> prints "NGL PEAK PEAK_NEXT" or nothing
  local kind=$1 n=$2 per=$3 pk pk1="-" it
  for it in 1 2 3 4 5 6; do
    [ "$(left)" -lt 60 ] && return
    pk=$(probe "$kind" "$n")
    if [ "$pk" -gt "$CAP_MIB" ]; then
      [ "$pk" -eq 99999 ] && [ "$n" -le 1 ] && return
      n=$(( n - (pk == 99999 ? 1 : (pk - CAP_MIB + per - 1) / per) )); [ $n -lt 1 ] && n=1; continue
    fi
    [ "$n" -ge 41 ] && { echo "$n $pk -"; return; }
    pk1=$(probe "$kind" $(( n + 1 )))
    if [ "$pk1" -le "$CAP_MIB" ]; then n=$(( n + 1 + (CAP_MIB - pk1) / per )); [ $n -gt 41 ] && n=41; continue; fi
    echo "$n $pk $pk1"; return
  done
}

# one llama.cpp step; returns 0 when it ran (its record written)
llama_step() {
  local s=$1 need n pk pk1 free shape
  scenario "$s" > /dev/null || { log "unknown step $s"; return 1; }
  shape=$(scenario "$s" | cut -d' ' -f3)
  case $s in llama_cap_13b_b16) need=150 ;; llama_cap_13b_b1) need=70 ;; *) need=40 ;; esac
  if [ "$(left)" -lt $need ]; then skip "$s" "time"; return 1; fi
  gguf_ready "$shape" || { skip "$s" "no GGUF"; return 1; }
  case $s in
    llama_ref_7b_b1|llama_ref_13b_b1)
      lb "$s" "$shape" "$(lim 90)" -ngl 99 -p 512 -n 128 -r 3
      record "$s" "Q4_0, all layers on GPU, flash attn" "$s.out" ;;
    llama_ref_13b_b16)
      lbb "$s" "$(lim 90)" -c 6144 -ngl 99 -npp 256 -ntg 128 -npl 16
      record "$s" "Q4_0, all on GPU, f16 KV, flash attn" "$s.out" ;;
    llama_cap_13b_b1|llama_cap_13b_b16)
      if [ -n "${NO_PROBE:-}" ]; then  # short of time: the rig's answer, its peak checked by the run itself
        if [ $s = llama_cap_13b_b1 ]; then n=30; else n=22; fi; pk="(run)"; pk1="not probed"
      elif [ $s = llama_cap_13b_b1 ]; then read -r n pk pk1 <<< "$(search_ngl b1 30 186)"
      else read -r n pk pk1 <<< "$(search_ngl b16 22 234)"; fi
      if [ -z "${n:-}" ]; then
        log "$s: no -ngl found under ${CAP_MIB} MiB"; RC=1; PEAK=""; IDLE=""; WALL=0
        echo "no -ngl under the cap (probes: $(cd "$W" && ls probe_* 2>/dev/null | tr '\n' ' '))" > "$R/$s.err"
        record "$s" "search for -ngl" ""; return 0
      fi
      log "$s: -ngl $n (probe peak $pk MiB; -ngl $((n + 1)): $pk1 MiB)"
      if [ $s = llama_cap_13b_b1 ]; then
        [ "$(left)" -lt 30 ] && { skip "$s" "time"; return 1; }
        lb "$s" 13b $(( $(left) - 5 )) -ngl "$n" -p 512 -n 128 -r 2
        record "$s" "Q4_0, -ngl $n of 41 (largest under the cap; $((n + 1)) peaked at $pk1 MiB), flash attn" "$s.out"
      else
        [ "$(left)" -lt 100 ] && { skip "$s" "time"; return 1; }
        lbb "$s" $(( $(left) - 5 )) -ctk q8_0 -ctv q8_0 -c 6144 -ngl "$n" -npp 256 -ntg 128 -npl 16
        record "$s" "Q4_0, q8_0 KV, -ngl $n of 41 (largest under the cap; $((n + 1)) peaked at $pk1 MiB), flash attn" "$s.out"
      fi ;;
    llama_fit_13b_b1)
      # llama.cpp's own fitter (what llama-server/llama-cli --fit do): keep free - cap MiB unused
      free=$(nvidia-smi -i 0 --query-gpu=memory.free --format=csv,noheader,nounits | head -1)
      lb "$s" 13b "$(lim 90)" -fitt $(( free - CAP_MIB )) -fitc 640 -p 512 -n 128 -r 2
      record "$s" "Q4_0, llama.cpp's own fitter (-fitt free-cap), flash attn" "$s.out" ;;
  esac
  return 0
}

LLAMA_STEPS="llama_ref_7b_b1 llama_ref_13b_b1 llama_ref_13b_b16 llama_cap_13b_b1 llama_cap_13b_b16 llama_fit_13b_b1"
llama_phase() {
  local todo=() s
  for s in $LLAMA_STEPS; do wanted "$s" && ! done_ "$s" && todo+=("$s"); done
  [ ${#todo[@]} -eq 0 ] && return 0
  build || { pre_join; for s in "${todo[@]}"; do skip "$s" "no llama.cpp build"; done; return 1; }
  pre_join
  for s in "${todo[@]}"; do llama_step "$s" && mark "$s"; done
}

# ======================================= Python: ours, accelerate, bitsandbytes ===========================
py_setup() {
  done_ pysetup && return 0
  if ! python3 -c "import gguf" 2> /dev/null; then
    if ls "$REPO"/.wheels/*.whl > /dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps "$REPO"/.wheels/*.whl > "$R/pip.txt" 2>&1 || log "pip install of .wheels failed (pip.txt)"
    else
      log "no .wheels and no gguf package: vramwise cannot load (carry .wheels)"
    fi
  fi
  mark pysetup
}

# one Python step (ours, accelerate offload, bitsandbytes); returns 0 when it ran (its record written)
py_step() {
  local s=$1 need=60 limit e f shape cap b p g setup
  scenario "$s" > /dev/null || { log "unknown step $s"; return 1; }
  read -r e f shape cap b p g <<< "$(scenario "$s")"
  case $s in ours_cap_*|hf_offload_*) need=90 ;; esac
  if [ "$(left)" -lt $need ]; then skip "$s" "time"; return 1; fi
  limit=$(lim 200)
  local common=(--batch "$b" --prompt-len "$p" --gen-len "$g" --json "$R/$s.json")
  case $s in
    ours_*)
      local capflag=(); setup="int4"
      # Under the cap the head is int8 (164 MB less for 13B: llama.cpp's Q4_0 preset, and make_gguf.py, keep
      # their output matrix at Q6_K); uncapped it stays fp16, where cuBLAS reads it faster than our W8 GEMV.
      [ "$cap" -gt 0 ] && { capflag+=(--lm-head-bits 8 --gpu-memory "$(cap_text)"); setup="$setup, lm_head int8, --gpu-memory $(cap_text)"; }
      [[ $s == *_eager ]] && { capflag+=(--enforce-eager); setup="$setup, --enforce-eager"; }
      # sized for the scenario: the KV pool holds exactly B sequences of p + g tokens (a budget plans for it)
      capflag+=(--max-num-seqs "$b" --max-model-len $(( p + g )))
      # int8 KV: at 16 sequences always (llama.cpp's batched run has q8_0 KV); at batch 1 in the _kv8 variant only
      # (llama.cpp's batch-1 runs keep f16 KV, as ours_cap_13b_b1 does)
      { [ "$cap" -gt 0 ] && [ "$b" -gt 1 ]; } || [[ $s == *_kv8 ]] && { capflag+=(--kv-cache-dtype int8); setup="$setup, int8 KV"; }
      [ "$cap" -eq 0 ] && capflag+=(--kv-cache-memory "$(( b * (p + g) * 840000 / 1048576 + 256 ))MiB")  # 13B: 800 KiB/token fp16
      # shellcheck disable=SC2086
      measure "$s" "$limit" env PYTHONPATH="$REPO/src" python3 -m vramwise.cli bench --random-weights "llama-2-$shape" \
        --quantization int4 ${capflag[@]+"${capflag[@]}"} --no-progress "${common[@]}" ${OURS_ARGS:-}
      record "$s" "$setup${OURS_ARGS:+ $OURS_ARGS}" "$s.json" ;;
    hf_offload_*)
      measure "$s" "$limit" env PYTHONPATH="$REPO/src" python3 "$HERE/hf_peers.py" offload --shape "$shape" \
        --cap-mib "$cap" "${common[@]}"
      record "$s" "fp16, accelerate device_map with max_memory $(cap_text), rest on CPU; $g tokens timed" "$s.json" ;;
    bnb_*)
      setup="NF4 (double quant), fp16 compute"; [ "$cap" -gt 0 ] && setup="$setup, torch memory fraction $(cap_text)"
      measure "$s" "$limit" env PYTHONPATH="$REPO/src:$PEER/pylib" python3 "$HERE/hf_peers.py" nf4 --shape "$shape" \
        --cap-mib "$cap" "${common[@]}"
      record "$s" "$setup" "$s.json" ;;
    hf_fp16_*)
      measure "$s" "$limit" env PYTHONPATH="$REPO/src" python3 "$HERE/hf_peers.py" fp16 --shape "$shape" "${common[@]}"
      record "$s" "fp16, all on GPU" "$s.json" ;;
  esac
  return 0
}

# order = priority: the 13B-under-6-GiB comparison first, optional extras (uncapped bitsandbytes 13B, fp16) last
PY_STEPS=${PY_STEPS:-"ours_cap_13b_b1 ours_cap_13b_b16 hf_offload_13b_cap bnb_nf4_13b_cap bnb_nf4_7b ours_13b_b1 ours_7b_b1 ours_13b_b16 bnb_nf4_13b hf_fp16_13b"}
py_phase() {
  local s
  pre_join  # nothing else on the GPU while a step is timed and its NVML peak read
  py_setup
  for s in $PY_STEPS; do wanted "$s" && ! done_ "$s" && { py_step "$s" && mark "$s"; }; done
  return 0
}

finish() {
  sync_out
  log "table (python3 benchmarks/peers/table.py DIR... merges the peers/ folders of both parts):"
  $TABLE show "$R" ${VW_COMMIT:+--commit "$VW_COMMIT"} | tee "$R/table.md"
  $TABLE show "$R" --headline ${VW_COMMIT:+--commit "$VW_COMMIT"} > "$R/headline.md" 2>&1
  $TABLE show "$R" --plot "$R/side_by_side.png" > /dev/null 2>&1 || log "no plot (matplotlib missing?): table.py --plot can draw it later"
  sync_out
  # the device tool brings back at most 8 files: one archive of the results, the table and the plot
  tar czf "$OUT/peers_$PART.tgz" -C "$OUT" peers && cp "$R/table.md" "$OUT/table_$PART.md" 2>/dev/null \
    && cp "$R/side_by_side.png" "$OUT/side_by_side_$PART.png" 2>/dev/null
  [ -n "${SBS_KEEP_OUT:-}" ] || rm -rf "$OUT/peers"
}

# ======================================= main =============================================================
env_txt
log "start: deadline ${DEADLINE_S}s, cap ${CAP_MIB} MiB, work $W, $(nproc) cores, $(nvidia-smi -i 0 --query-gpu=name --format=csv,noheader 2>/dev/null)"
PREPID=""
if [ -n "${PRE_CMD:-}" ]; then  # runs beside the (niced) build; joined before the first timed llama.cpp run
  log "PRE_CMD in the background: $PRE_CMD"
  ( cd "$REPO" && timeout -k 5 $(( DEADLINE_S - 60 )) bash -c "$PRE_CMD" > "$OUT/pre.txt" 2>&1; echo "PRE rc=$?" >> "$OUT/pre.txt" ) &
  PREPID=$!
fi
pre_join() { [ -n "$PREPID" ] && { log "waiting for PRE_CMD"; wait "$PREPID"; PREPID=""; log "PRE_CMD done: $(tail -1 "$OUT/pre.txt")"; }; return 0; }
if [ "$PART" = part1 ]; then
  llama_phase
  # time left over (a fast build): start on part 2's Python steps; part 2 skips what is done here
  llama_left=0; for s in $LLAMA_STEPS; do wanted "$s" && ! done_ "$s" && llama_left=1; done
  [ $llama_left -eq 0 ] && [ "$(left)" -gt 120 ] && py_phase
else
  if built || [ -f "$L/build/CMakeCache.txt" ]; then   # warm: part 1's build (done or interrupted) is here
    PHASE_END=$(( DEADLINE_S - PY_RESERVE_S ))
    llama_phase
    PHASE_END=$DEADLINE_S
    py_phase
  else                                                  # cold: Python steps first, then a build if time allows
    py_phase
    if [ "$(left)" -gt 400 ]; then llama_phase; else
      for s in $LLAMA_STEPS; do wanted "$s" && ! done_ "$s" && skip "$s" "cold machine: run part1, then part2 at once"; done
    fi
  fi
fi
pre_join
[ -n "$GENPID" ] && kill "$GENPID" 2> /dev/null
finish
log "done"
