#!/usr/bin/env bash
# Regenerate the speech clips under tests/data/audio (committed, so tests need neither tool):
# espeak-ng speaks the text, sox converts it to 16 kHz mono 16-bit PCM (the other formats: flac, ogg, mp3, and a
# 8 kHz stereo wav to exercise resampling and down-mixing).
#   apt-get install espeak-ng sox libsox-fmt-mp3
# Usage: scripts/make_test_audio.sh [OUT_DIR]   (default tests/data/audio)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/usage.sh"  # -h/--help: print the comment above
OUT=${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/data/audio}
mkdir -p "$OUT"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
say() {  # say NAME VOICE TEXT
    espeak-ng -v "$2" -s 150 -w "$TMP/$1.wav" "$3"
    sox "$TMP/$1.wav" -r 16000 -c 1 -b 16 "$OUT/$1.wav"
}
say english en-us "The quick brown fox jumps over the lazy dog."
say numbers en-us "My phone number is five five five, one two three four."
say french fr "Bonjour, je m'appelle Marie et j'habite à Paris."
sox "$OUT/english.wav" "$OUT/english.flac"
sox "$OUT/english.wav" "$OUT/english.ogg"
sox "$OUT/english.wav" "$OUT/english.mp3"
sox "$OUT/english.wav" -r 8000 -c 2 "$OUT/english-8k-stereo.wav"
ls -l "$OUT"
