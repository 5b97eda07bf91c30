#!/usr/bin/env bash
# Shell helpers the launch scripts share (launch_node.sh, launch_disagg.sh); sourced, not run.

# How many GPUs the server will see: CUDA_VISIBLE_DEVICES wins when set ("" or -1 mean none), else nvidia-smi.
count_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        local devices="${CUDA_VISIBLE_DEVICES// /}"
        if [[ -z "$devices" || "$devices" == -1* ]]; then echo 0; return; fi
        local list
        IFS=',' read -r -a list <<<"$devices"
        echo "${#list[@]}"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# The arguments as one line a shell reads back the same (Python's shlex too), for logging the command run:
# words that need no quoting as they are, the rest in single quotes.
quote() {
    local word out=()
    for word in "$@"; do
        if [[ "$word" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then out+=("$word"); else out+=("'${word//\'/\'\\\'\'}'"); fi
    done
    echo "${out[*]}"
}
