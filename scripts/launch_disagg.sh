#!/usr/bin/env bash
# Disaggregated prefill/decode: a prefill instance computes each prompt's KV cache, a decode instance pulls it
# and generates, and scripts/disagg_proxy.py routes every request prefill-then-decode behind one OpenAI API.
#
# One machine (the default, --role all): prefill, decode and the proxy, stopped together by Ctrl-C/SIGTERM:
#   scripts/launch_disagg.sh [MODEL] [extra `conveyor serve` flags for both instances...]
#   scripts/launch_disagg.sh /models/qwen2 --max-model-len 4096
#   curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' -d '{"prompt": "Hi", ...}'
#
# A cluster: run one role per host (each instance uses all of its host's GPUs, see scripts/launch_node.sh):
#   h1$ scripts/launch_disagg.sh --role prefill --kv-ip 10.0.0.1 /models/qwen2    # API :8100, KV :14579
#   h2$ scripts/launch_disagg.sh --role prefill --kv-ip 10.0.0.2 /models/qwen2
#   h3$ scripts/launch_disagg.sh --role decode /models/qwen2                        # API :8200
#   h0$ scripts/launch_disagg.sh --role proxy --prefill-hosts 10.0.0.1:8100,10.0.0.2:8100 \
#                                --decode-hosts 10.0.0.3:8200                       # API :8000
# --kv-ip is the address decode hosts reach the prefill host's KV port at (default: the first address of
# `hostname -I`); a prefill instance with -tp N listens on PREFILL_KV_PORT .. PREFILL_KV_PORT+N-1.
#
# Options (before MODEL or anywhere else; MODEL is the first bare word not following an unknown flag):
#   --role all|prefill|decode|proxy   what to run here [all]
#   --prefill-hosts H:P[,H:P...]      --role proxy: the prefill instances (http:// optional)
#   --decode-hosts H:P[,H:P...]       --role proxy: the decode instances
#   --kv-ip ADDRESS                   --role prefill/all: the KV address written into kv_ip
#   --dry-run                         print the commands, start nothing
# Everything else is passed to `conveyor serve` (e.g. --max-model-len 4096 --api-key KEY).
# Environment (defaults in brackets):
#   PREFILL_PORT [8100], DECODE_PORT [8200], PORT [8000] (proxy), PREFILL_KV_PORT [14579]
#   HOST [127.0.0.1 with --role all, else 0.0.0.0]     where the APIs listen
#   KV_CONNECTOR [ZmqPullConnector] or SharedStorageConnector with KV_SHARED_PATH (a folder every instance
#     sees [${TMPDIR:-/tmp}/conveyor-kv-shared]); KV_EXTRA_CONFIG: a JSON object merged into
#     kv_connector_extra_config (e.g. '{"lease_s": 300}')
#   --role all on a GPU machine: PREFILL_GPUS / DECODE_GPUS (CUDA_VISIBLE_DEVICES of each) [the visible GPUs
#     split in two halves; with one GPU both share it, each with --gpu-memory-utilization
#     ${GPU_MEMORY_UTILIZATION:-0.4}]; on CPU each instance gets OMP_NUM_THREADS [cores / 2]
#   LOG_DIR [${TMPDIR:-/tmp}], PYTHON, TP, API_SERVERS (as for launch_node.sh), HEALTH_TIMEOUT [900]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/usage.sh"  # -h/--help: print the comment above
source "$(dirname "${BASH_SOURCE[0]}")/lib/launch_common.sh"  # count_gpus, quote

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODE_SCRIPT="$REPO/scripts/launch_node.sh"
PROXY_SCRIPT="$REPO/scripts/disagg_proxy.py"

die() { echo "launch_disagg: $*" >&2; exit 2; }  # bad usage
fail() { echo "launch_disagg: $*" >&2; exit 1; }  # something did not start

ROLE=all
PREFILL_HOSTS=""
DECODE_HOSTS=""
KV_IP="${KV_IP:-}"
DRY_RUN=0
MODEL=()
EXTRA=()
set_option() {  # $1: option name, $2: value
    case "$1" in
        --role) ROLE="$2" ;;
        --prefill-hosts) PREFILL_HOSTS="$2" ;;
        --decode-hosts) DECODE_HOSTS="$2" ;;
        --kv-ip) KV_IP="$2" ;;
    esac
}
# A bare word right after an unknown `--flag` is taken as that flag's value, so MODEL should come first.
after_unknown_flag=0
while [[ $# -gt 0 ]]; do
    arg="$1"
    shift
    unknown_flag=0
    case "$arg" in
        --role|--prefill-hosts|--decode-hosts|--kv-ip)
            [[ $# -ge 1 ]] || die "$arg needs a value"
            set_option "$arg" "$1"
            shift ;;
        --role=*|--prefill-hosts=*|--decode-hosts=*|--kv-ip=*) set_option "${arg%%=*}" "${arg#*=}" ;;
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        -*=*) EXTRA+=("$arg") ;;
        -*) EXTRA+=("$arg"); unknown_flag=1 ;;
        *)
            if [[ ${#MODEL[@]} -eq 0 && $after_unknown_flag -eq 0 ]]; then MODEL=("$arg"); else EXTRA+=("$arg"); fi ;;
    esac
    after_unknown_flag=$unknown_flag
done
case "$ROLE" in all|prefill|decode|proxy) ;; *) die "--role must be all, prefill, decode or proxy, not '$ROLE'" ;; esac
if [[ "$ROLE" == proxy ]]; then
    [[ -n "$PREFILL_HOSTS" && -n "$DECODE_HOSTS" ]] || die "--role proxy needs --prefill-hosts and --decode-hosts"
    [[ ${#MODEL[@]} -eq 0 && ${#EXTRA[@]} -eq 0 ]] || die "--role proxy takes no model or serve flags"
elif [[ -n "$PREFILL_HOSTS$DECODE_HOSTS" ]]; then
    die "--prefill-hosts/--decode-hosts are for --role proxy (--role $ROLE runs on 127.0.0.1 or this host)"
fi

PREFILL_PORT="${PREFILL_PORT:-8100}"
DECODE_PORT="${DECODE_PORT:-8200}"
PORT="${PORT:-8000}"
PREFILL_KV_PORT="${PREFILL_KV_PORT:-14579}"
KV_CONNECTOR="${KV_CONNECTOR:-ZmqPullConnector}"
KV_SHARED_PATH="${KV_SHARED_PATH:-${TMPDIR:-/tmp}/conveyor-kv-shared}"
if [[ "$ROLE" == all ]]; then HOST="${HOST:-127.0.0.1}"; else HOST="${HOST:-0.0.0.0}"; fi
LOG_DIR="${LOG_DIR:-${TMPDIR:-/tmp}}"
HEALTH_TIMEOUT="${HEALTH_TIMEOUT:-900}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHON

kv_transfer_config() {  # $1: kv_producer | kv_consumer -> the --kv-transfer-config JSON
    KV_ROLE="$1" KV_IP="$KV_IP" KV_CONNECTOR="$KV_CONNECTOR" KV_PORT="$PREFILL_KV_PORT" \
    KV_SHARED_PATH="$KV_SHARED_PATH" KV_EXTRA_CONFIG="${KV_EXTRA_CONFIG:-}" "$PYTHON" -c '
import json, os
env = os.environ
config = {"kv_connector": env["KV_CONNECTOR"], "kv_role": env["KV_ROLE"]}
if env["KV_ROLE"] == "kv_producer":  # only producers listen; consumers pull from the address in each request
    config.update(kv_ip=env["KV_IP"], kv_port=int(env["KV_PORT"]))
extra = {"shared_storage_path": env["KV_SHARED_PATH"]} if env["KV_CONNECTOR"] == "SharedStorageConnector" else {}
extra.update(json.loads(env["KV_EXTRA_CONFIG"] or "{}"))
if extra:
    config["kv_connector_extra_config"] = extra
print(json.dumps(config, separators=(",", ":")))'
}


# INSTANCE_ENV / INSTANCE_FLAGS: what one instance of --role all adds to launch_node.sh's environment and
# flags so that prefill and decode share the machine instead of each taking all of it.
split_machine() {  # $1: 0 for prefill, 1 for decode
    INSTANCE_ENV=()
    INSTANCE_FLAGS=()
    local num_gpus
    num_gpus="$(count_gpus)"
    if [[ "$num_gpus" -eq 0 ]]; then
        local cores
        cores="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
        INSTANCE_ENV+=("OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / 2 > 0 ? cores / 2 : 1 ))}")
        return
    fi
    local chosen="${PREFILL_GPUS:-}"
    [[ "$1" -eq 1 ]] && chosen="${DECODE_GPUS:-}"
    if [[ -z "$chosen" ]]; then
        local devices=()
        if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
            IFS=',' read -r -a devices <<<"${CUDA_VISIBLE_DEVICES// /}"
        else
            mapfile -t devices < <(seq 0 $(( num_gpus - 1 )))
        fi
        if [[ "$num_gpus" -eq 1 ]]; then
            chosen="${devices[0]}"
            case " ${EXTRA[*]} " in
                *" --gpu-memory-utilization"*) ;;
                *) INSTANCE_FLAGS+=(--gpu-memory-utilization "${GPU_MEMORY_UTILIZATION:-0.4}") ;;
            esac
        else
            local half=$(( num_gpus / 2 ))
            if [[ "$1" -eq 0 ]]; then chosen="$(IFS=,; echo "${devices[*]:0:half}")"
            else chosen="$(IFS=,; echo "${devices[*]:half}")"; fi  # an odd one out goes to decode
        fi
    fi
    INSTANCE_ENV+=("CUDA_VISIBLE_DEVICES=$chosen")
}

# Sets COMMAND_ENV and COMMAND for one instance ($1: prefill | decode).
instance_command() {
    local name="$1" kv_role port index
    if [[ "$name" == prefill ]]; then kv_role=kv_producer; port="$PREFILL_PORT"; index=0
    else kv_role=kv_consumer; port="$DECODE_PORT"; index=1; fi
    COMMAND_ENV=("PORT=$port" "HOST=$HOST" "LOG_FILE=$LOG_DIR/conveyor-$name-$port.log")
    local flags=()
    if [[ "$ROLE" == all ]]; then
        split_machine "$index"
        COMMAND_ENV+=("${INSTANCE_ENV[@]}")
        flags=("${INSTANCE_FLAGS[@]}")
    fi
    COMMAND=("$NODE_SCRIPT" "${MODEL[@]}" --kv-transfer-config "$(kv_transfer_config "$kv_role")" "${flags[@]}"
             "${EXTRA[@]}")
}

url_list() {  # "h1:8100,http://h2:8100" -> http://h1:8100 http://h2:8100
    local item
    IFS=',' read -r -a items <<<"$1"
    for item in "${items[@]}"; do
        [[ -n "$item" ]] || continue
        if [[ "$item" == *://* ]]; then echo "$item"; else echo "http://$item"; fi
    done
}

proxy_command() {  # $1, $2: comma-separated prefill and decode hosts
    local prefill decode
    mapfile -t prefill < <(url_list "$1")
    mapfile -t decode < <(url_list "$2")
    COMMAND_ENV=()
    COMMAND=("$PYTHON" "$PROXY_SCRIPT" --host "$HOST" --port "$PORT" --prefill "${prefill[@]}"
             --decode "${decode[@]}")
}

show() {  # $1: label; prints COMMAND_ENV and COMMAND
    echo "+ [$1] $(quote "${COMMAND_ENV[@]}" "${COMMAND[@]}")"
}

if [[ "$ROLE" == prefill || "$ROLE" == all ]] && [[ -z "$KV_IP" ]]; then
    if [[ "$ROLE" == all ]]; then
        KV_IP=127.0.0.1
    else
        KV_IP="$(hostname -I 2>/dev/null | awk '{print $1}')"
        [[ -n "$KV_IP" ]] || die "cannot find this host's address; pass --kv-ip ADDRESS (reachable from decode hosts)"
        echo "launch_disagg: kv_ip $KV_IP (the first address of \`hostname -I\`; --kv-ip to choose)" >&2
    fi
fi

# One role on this host: print the command and become it (its own signal handling then applies).
if [[ "$ROLE" != all ]]; then
    if [[ "$ROLE" == proxy ]]; then proxy_command "$PREFILL_HOSTS" "$DECODE_HOSTS"; else instance_command "$ROLE"; fi
    show "$ROLE"
    if [[ "$DRY_RUN" -eq 1 ]]; then
        [[ "$ROLE" == proxy ]] || env "${COMMAND_ENV[@]}" DRY_RUN=1 "${COMMAND[@]}" 2>/dev/null | sed "s/^/  [$ROLE] /"
        exit 0
    fi
    exec env "${COMMAND_ENV[@]}" "${COMMAND[@]}"
fi

# --role all: everything on this machine.
instance_command prefill; PREFILL_ENV=("${COMMAND_ENV[@]}"); PREFILL_COMMAND=("${COMMAND[@]}"); show prefill
instance_command decode; DECODE_ENV=("${COMMAND_ENV[@]}"); DECODE_COMMAND=("${COMMAND[@]}"); show decode
PROBE_HOST="$HOST"
[[ "$PROBE_HOST" == 0.0.0.0 ]] && PROBE_HOST=127.0.0.1
proxy_command "$PROBE_HOST:$PREFILL_PORT" "$PROBE_HOST:$DECODE_PORT"; PROXY_COMMAND=("${COMMAND[@]}"); show proxy
if [[ "$DRY_RUN" -eq 1 ]]; then
    env "${PREFILL_ENV[@]}" DRY_RUN=1 "${PREFILL_COMMAND[@]}" 2>/dev/null | sed 's/^/  [prefill] /'
    env "${DECODE_ENV[@]}" DRY_RUN=1 "${DECODE_COMMAND[@]}" 2>/dev/null | sed 's/^/  [decode] /'
    exit 0
fi

PIDS=()
stop_all() {
    local pid waited=0
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    # launch_node.sh gives its server 30 s before SIGKILL; allow a little more.
    while (( waited < 400 )); do
        local alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        (( alive )) || break
        sleep 0.1
        waited=$(( waited + 1 ))
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    PIDS=()
}
trap 'echo "launch_disagg: stopping" >&2; stop_all; exit 143' TERM
trap 'echo "launch_disagg: stopping" >&2; stop_all; exit 130' INT
trap 'stop_all' EXIT

probe_health() {  # $1: URL -> 0 if it answers 200
    if command -v curl >/dev/null 2>&1; then
        curl -sf -o /dev/null --max-time 5 "$1"
    else
        "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$1" >/dev/null 2>&1
    fi
}

wait_healthy() {  # $1: name, $2: URL, $3: pid -> 0 once GET $2/health is 200; 1 if the pid died or time ran out
    local started=$SECONDS
    printf 'launch_disagg: waiting for %s (%s/health) ' "$1" "$2" >&2
    until probe_health "$2/health"; do
        if ! kill -0 "$3" 2>/dev/null || (( SECONDS - started > HEALTH_TIMEOUT )); then
            echo " failed" >&2
            return 1
        fi
        printf . >&2
        sleep 1
    done
    echo " ok" >&2
}

env "${PREFILL_ENV[@]}" "${PREFILL_COMMAND[@]}" & PIDS+=($!); PREFILL_PID=$!
env "${DECODE_ENV[@]}" "${DECODE_COMMAND[@]}" & PIDS+=($!); DECODE_PID=$!
wait_healthy prefill "http://$PROBE_HOST:$PREFILL_PORT" "$PREFILL_PID" \
    || fail "the prefill instance did not come up (log: $LOG_DIR/conveyor-prefill-$PREFILL_PORT.log)"
wait_healthy decode "http://$PROBE_HOST:$DECODE_PORT" "$DECODE_PID" \
    || fail "the decode instance did not come up (log: $LOG_DIR/conveyor-decode-$DECODE_PORT.log)"
PROXY_LOG="$LOG_DIR/conveyor-proxy-$PORT.log"
"${PROXY_COMMAND[@]}" >"$PROXY_LOG" 2>&1 & PIDS+=($!); PROXY_PID=$!
wait_healthy proxy "http://$PROBE_HOST:$PORT" "$PROXY_PID" \
    || { tail -n 20 "$PROXY_LOG" >&2; fail "the proxy did not come up (log: $PROXY_LOG)"; }
echo "launch_disagg: ready at http://$PROBE_HOST:$PORT/v1" \
     "(prefill :$PREFILL_PORT, decode :$DECODE_PORT; logs in $LOG_DIR)"

# Any part ending ends the whole set: a proxy without one of its instances only answers errors.
status=0
wait -n "${PIDS[@]}" || status=$?
echo "launch_disagg: a process exited (status $status); stopping the rest" >&2
exit "$status"
