#!/usr/bin/env bash
# Serve one model on one node with all of it: every visible GPU as a tensor-parallel rank (or, on CPU,
# TP=${TP:-1} workers sharing the cores), and several API server processes in front of the engine.
#
#   scripts/launch_node.sh [MODEL] [extra `conveyor serve` flags...]
#
#   scripts/launch_node.sh                                   # the embedded SmolLM2-135M-Instruct
#   scripts/launch_node.sh /models/Llama-3.1-8B-Instruct --max-model-len 8192
#   PORT=9000 API_SERVERS=4 scripts/launch_node.sh /models/qwen2 --api-key secret
#   TP=2 scripts/launch_node.sh /models/qwen2                # CPU: 2 workers, cores/2 threads each
#
# MODEL is the first argument unless it starts with '-'. Environment (defaults in brackets):
#   HOST [0.0.0.0], PORT [8000]      where the API listens
#   TP                               tensor-parallel size [GPUs: the number visible (CUDA_VISIBLE_DEVICES,
#                                    else `nvidia-smi -L`); CPU: 1]
#   API_SERVERS                      --api-server-count [CPU cores / 4, at least 1]
#   OMP_NUM_THREADS                  CPU: threads per worker [cores / TP, at least 1]; kept if already set
#   PYTHON                           interpreter [$REPO/.venv/bin/python if it exists, else python3]
#   LOG_FILE                         server output [${TMPDIR:-/tmp}/conveyor-node-$PORT.log]
#   HEALTH_TIMEOUT                   seconds to wait for GET /health [900]
#   DRY_RUN=1                        only print the command
# The script waits until /health answers 200, prints the URL, then waits on the server; Ctrl-C or SIGTERM stops
# the server (SIGKILL after STOP_TIMEOUT [30] seconds). If the server dies during start-up, the end of its log
# is printed and the exit status is non-zero.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/usage.sh"  # -h/--help: print the comment above
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch_common.sh"  # count_gpus, quote

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

MODEL=()
if [[ $# -gt 0 && "$1" != -* ]]; then
    MODEL=("$1")
    shift
fi


# GNU nproc answers OMP_NUM_THREADS when that is set; the machine's cores are wanted here.
NUM_CORES="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
NUM_GPUS="$(count_gpus)"
if [[ "$NUM_GPUS" -gt 0 ]]; then
    TP="${TP:-$NUM_GPUS}"
else
    TP="${TP:-1}"
    # Workers split the cores; the frontends mostly wait on sockets, so they are not counted.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( NUM_CORES / TP > 0 ? NUM_CORES / TP : 1 ))}"
fi
API_SERVERS="${API_SERVERS:-$(( NUM_CORES / 4 > 0 ? NUM_CORES / 4 : 1 ))}"
export TOKENIZERS_PARALLELISM=false  # tokenizers' own thread pool would fight the workers for cores
HOST="${HOST:-0.0.0.0}"
PORT="${PORT:-8000}"
# A --host/--port among the extra flags wins (argparse keeps the last one); follow it for the health check.
ARGS=("$@")
for (( i = 0; i < ${#ARGS[@]}; i++ )); do
    case "${ARGS[i]}" in
        --port) PORT="${ARGS[i + 1]:-$PORT}" ;;
        --port=*) PORT="${ARGS[i]#--port=}" ;;
        --host) HOST="${ARGS[i + 1]:-$HOST}" ;;
        --host=*) HOST="${ARGS[i]#--host=}" ;;
    esac
done
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
# So `python3 -m conveyor` also works from a plain checkout; MODEL stays relative to the caller's directory.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
LOG_FILE="${LOG_FILE:-${TMPDIR:-/tmp}/conveyor-node-$PORT.log}"
HEALTH_TIMEOUT="${HEALTH_TIMEOUT:-900}"
STOP_TIMEOUT="${STOP_TIMEOUT:-30}"

COMMAND=("$PYTHON" -m conveyor serve "${MODEL[@]}" --host "$HOST" --port "$PORT" -tp "$TP"
         --api-server-count "$API_SERVERS" "$@")
# The printed line can be pasted into a shell (and split with Python's shlex).
SHOWN_ENV=(TOKENIZERS_PARALLELISM=false)
[[ -n "${OMP_NUM_THREADS:-}" ]] && SHOWN_ENV+=("OMP_NUM_THREADS=$OMP_NUM_THREADS")
[[ -n "${CUDA_VISIBLE_DEVICES+set}" ]] && SHOWN_ENV+=("CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES")
echo "launch_node: $NUM_GPUS GPU(s), $NUM_CORES CPU core(s): TP=$TP, $API_SERVERS API server(s)" >&2
echo "+ $(quote "${SHOWN_ENV[@]}" "${COMMAND[@]}")"
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    exit 0
fi

SERVER_PID=""
stop_server() {
    [[ -n "$SERVER_PID" ]] || return 0
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        local waited=0
        while kill -0 "$SERVER_PID" 2>/dev/null && (( waited < STOP_TIMEOUT * 10 )); do
            sleep 0.1
            waited=$(( waited + 1 ))
        done
        if kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "launch_node: server did not stop in ${STOP_TIMEOUT}s, killing it" >&2
            kill -KILL "$SERVER_PID" 2>/dev/null || true
        fi
    fi
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}
trap 'echo "launch_node: stopping" >&2; stop_server; exit 143' TERM
trap 'echo "launch_node: stopping" >&2; stop_server; exit 130' INT
trap 'stop_server' EXIT

"${COMMAND[@]}" >"$LOG_FILE" 2>&1 &
SERVER_PID=$!
echo "launch_node: server pid $SERVER_PID, log $LOG_FILE" >&2

# 0.0.0.0 is a bind address, not one to connect to.
PROBE_HOST="$HOST"
if [[ "$PROBE_HOST" == 0.0.0.0 || "$PROBE_HOST" == "::" || -z "$PROBE_HOST" ]]; then PROBE_HOST=127.0.0.1; fi
[[ "$PROBE_HOST" == *:* ]] && PROBE_HOST="[$PROBE_HOST]"
HEALTH_URL="http://$PROBE_HOST:$PORT/health"

healthy() {
    if command -v curl >/dev/null 2>&1; then
        curl -sf -o /dev/null --max-time 5 "$HEALTH_URL"
    else
        "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$HEALTH_URL" \
            >/dev/null 2>&1
    fi
}

printf 'launch_node: waiting for %s ' "$HEALTH_URL" >&2
started=$SECONDS
until healthy; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        status=0
        wait "$SERVER_PID" || status=$?
        SERVER_PID=""
        echo >&2
        echo "launch_node: the server exited during start-up (status $status); end of $LOG_FILE:" >&2
        tail -n 40 "$LOG_FILE" >&2
        exit 1
    fi
    if (( SECONDS - started > HEALTH_TIMEOUT )); then
        echo >&2
        echo "launch_node: not healthy after ${HEALTH_TIMEOUT}s; end of $LOG_FILE:" >&2
        tail -n 40 "$LOG_FILE" >&2
        exit 1  # the EXIT trap stops the server
    fi
    printf . >&2
    sleep 1
done
echo >&2

SHOWN_HOST="$PROBE_HOST"
if [[ "$HOST" == 0.0.0.0 ]]; then
    SHOWN_HOST="$(hostname -I 2>/dev/null | awk '{print $1}')"
    SHOWN_HOST="${SHOWN_HOST:-127.0.0.1}"
fi
echo "launch_node: ready at http://$SHOWN_HOST:$PORT/v1 (health: $HEALTH_URL)"

# `wait` returns early when a trapped signal arrives, so the traps above run promptly.
status=0
wait "$SERVER_PID" || status=$?
SERVER_PID=""
echo "launch_node: server exited with status $status" >&2
exit "$status"
