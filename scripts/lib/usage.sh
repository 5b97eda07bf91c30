#!/usr/bin/env bash
# --help for the shell scripts in scripts/: their usage text is their header comment (line 2 up to the
# `set -euo pipefail` line), printed without the leading '# '. A script sources this right after that line:
#   source "$(dirname "${BASH_SOURCE[0]}")/lib/usage.sh"
# and -h or --help as its first argument then prints the text and exits 0 before the script does anything;
# `usage` (a function) prints the same text for a script that also takes --help among later arguments.
set -euo pipefail

USAGE_SCRIPT="${BASH_SOURCE[1]:-${BASH_SOURCE[0]}}"
usage() { sed -n '2,/^set -euo/p' "$USAGE_SCRIPT" | sed '$d; s/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
