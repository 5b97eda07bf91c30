#!/usr/bin/env bash
# Scale-out benchmark: what tensor parallel, a second frontend and disaggregated prefill/decode cost or buy,
# each configuration against the same single-instance baseline, in one run.
#
#   scripts/run_scale_out_benchmark.sh      # -> bench_results/scale-out-<timestamp>/{results.md,results.json,logs/}
#
# Configurations (one up at a time, so they never share the CPU; the same prompts for all):
#   single  conveyor serve MODEL                       (the baseline)
#   tp2     conveyor serve MODEL -tp 2
#   fe2     conveyor serve MODEL --api-server-count 2
#   pd      prefill instance + decode instance (ZmqPullConnector) + scripts/disagg_proxy.py
# Threads: every configuration gets $THREADS cores in all (default: all of them): OMP_NUM_THREADS=$THREADS for
# one engine, $THREADS/2 per rank with -tp 2 and per instance with pd.
#
# Knobs (environment): CONFIGS="single tp2 fe2 pd" MODEL (default: the embedded SmolLM2-135M GGUF) TOKENIZER
# (a folder with tokenizer.json; default .models/llama, the same SmolLM2 tokenizer) INPUT_LEN OUTPUT_LEN
# CONCURRENCY="1 4 16" NUM_PROMPTS THREADS OUT_DIR READY_TIMEOUT CONVEYOR_ARGS (extra serve flags).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/usage.sh"  # -h/--help: print the comment above

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PY:-$REPO_DIR/.venv/bin/python}
CONFIGS=${CONFIGS:-single tp2 fe2 pd}
MODEL=${MODEL:-}
TOKENIZER=${TOKENIZER:-$REPO_DIR/.models/llama}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-128}
CONCURRENCY=${CONCURRENCY:-1 4 16}
NUM_PROMPTS=${NUM_PROMPTS:-}
THREADS=${THREADS:-$(nproc)}
READY_TIMEOUT=${READY_TIMEOUT:-600}
OUT_DIR=${OUT_DIR:-$REPO_DIR/bench_results/scale-out-$(date +%Y%m%d-%H%M%S)}
CONVEYOR_ARGS=${CONVEYOR_ARGS:---kv-cache-memory 1GiB --max-model-len 1024}
HALF=$(( THREADS > 1 ? THREADS / 2 : 1 ))
PORT=8100 PREFILL_PORT=8101 DECODE_PORT=8102 KV_PORT=14700
PIDS=()
mkdir -p "$OUT_DIR/logs"

log() { printf '[scale-out %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

stop_all() {  # every process runs in its own session: stop whole groups
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
    PIDS=()
}
trap stop_all EXIT
trap 'exit 130' INT TERM

start() {  # start LOG_NAME THREADS COMMAND...
    local name=$1 threads=$2; shift 2
    log "starting $name: $*"
    OMP_NUM_THREADS=$threads TOKENIZERS_PARALLELISM=false setsid "$@" > "$OUT_DIR/logs/$name.log" 2>&1 < /dev/null &
    PIDS+=($!)
}

serve() {  # serve LOG_NAME THREADS PORT FLAGS...
    local name=$1 threads=$2 port=$3; shift 3
    # shellcheck disable=SC2086
    start "$name" "$threads" "$PY" -m conveyor serve $MODEL --host 127.0.0.1 --port "$port" $CONVEYOR_ARGS "$@"
}

wait_ready() {  # wait_ready URL
    local deadline=$((SECONDS + READY_TIMEOUT))
    while ((SECONDS < deadline)); do
        curl -sf -o /dev/null --max-time 5 "$1/health" && return 0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null || { log "a process exited during start-up"; return 1; }; done
        sleep 1
    done
    log "$1 not ready after ${READY_TIMEOUT}s"; return 1
}

bench() {  # bench CONFIG
    local args=(--tokenizer "$TOKENIZER" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --concurrency $CONCURRENCY
                --target "$1=http://127.0.0.1:$PORT" --result-json "$OUT_DIR/$1.json" --result-md "$OUT_DIR/$1.md"
                --note "$1: THREADS=$THREADS nproc=$(nproc) $CONVEYOR_ARGS")
    [[ -n $NUM_PROMPTS ]] && args+=(--num-prompts "$NUM_PROMPTS")
    "$PY" "$REPO_DIR/scripts/bench_serving.py" "${args[@]}" || log "bench_serving reported failed requests ($1)"
}

kv() { printf '{"kv_connector": "ZmqPullConnector", "kv_role": "%s", "kv_port": %d}' "$1" "$KV_PORT"; }

log "results in $OUT_DIR; $THREADS threads, $INPUT_LEN in / $OUTPUT_LEN out, concurrency $CONCURRENCY"
parts=()
for config in $CONFIGS; do
    case $config in
        single) serve single "$THREADS" "$PORT" ;;
        tp2) serve tp2 "$HALF" "$PORT" -tp 2 ;;
        fe2) serve fe2 "$THREADS" "$PORT" --api-server-count 2 ;;
        pd) serve prefill "$HALF" "$PREFILL_PORT" --kv-transfer-config "$(kv kv_producer)"
            serve decode "$HALF" "$DECODE_PORT" --kv-transfer-config "$(kv kv_consumer)"
            start proxy 1 "$PY" "$REPO_DIR/scripts/disagg_proxy.py" --host 127.0.0.1 --port "$PORT" \
                --prefill "http://127.0.0.1:$PREFILL_PORT" --decode "http://127.0.0.1:$DECODE_PORT" ;;
        *) log "unknown configuration $config"; exit 2 ;;
    esac
    if wait_ready "http://127.0.0.1:$PORT"; then
        [[ $config == pd ]] && wait_ready "http://127.0.0.1:$PREFILL_PORT" && wait_ready "http://127.0.0.1:$DECODE_PORT"
        bench "$config"
        [[ -f $OUT_DIR/$config.json ]] && parts+=("$OUT_DIR/$config.json")
        if [[ $config == pd ]]; then
            curl -s "http://127.0.0.1:$DECODE_PORT/metrics" | grep -E '^conveyor:prompt_tokens_(computed|transferred)' \
                | tee "$OUT_DIR/pd-decode-prompt-tokens.txt" >&2 || true
        fi
    fi
    stop_all
done
((${#parts[@]})) || { log "nothing was benchmarked"; exit 1; }
"$PY" "$REPO_DIR/scripts/bench_serving.py" --combine "${parts[@]}" \
    --result-json "$OUT_DIR/results.json" --result-md "$OUT_DIR/results.md"
log "table: $OUT_DIR/results.md"
