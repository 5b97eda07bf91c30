"""`conveyor serve [MODEL] [flags]` and `conveyor frontend --engine-address ...`: parse the flags
(conveyor/flags.py), then hand over to the launcher."""
from __future__ import annotations

import sys

from conveyor.flags import build_parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from conveyor import launcher  # after parsing: --help stays fast

    sys.exit(launcher.serve(args) if args.command == "serve" else launcher.run_frontends(args))
