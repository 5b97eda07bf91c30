"""Linear-layer time on this CPU: Conveyor's blocked float32 GEMM (workers/kernels) against oneDNN's prepacked
matmul, the two packed forms `workers/layers/cpu_gemm.py` chooses between, on the same weights in the same run.

    python scripts/bench_gemm.py [--shapes 960x576 576x576 3072x576 576x1536] [--rows 1 2 4 16 64 512]
                                 [--layers 30] [--threads 2] [--result-md FILE]

Each shape is `out x in` (default: SmolLM2-135M's qkv, o, gate_up and down). Every call cycles through `--layers`
distinct weights so they stream from memory as in a real forward pass (one weight would sit in the CPU's
caches). Prints a markdown table of the mean milliseconds per call and the speed-up.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["960x576", "576x576", "3072x576", "576x1536"],
                        help="weight shapes, out x in")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 16, 64, 512], help="rows of x (tokens)")
    parser.add_argument("--layers", type=int, default=30, help="distinct weights per shape, cycled through")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--result-md", type=Path, default=None, help="also write the table here")
    return parser.parse_args(argv)


def _mean_ms(call: Callable[[int], object], layers: int, rows: int) -> float:
    for layer in range(layers):  # warm-up
        call(layer)
    repeats = max(2, 64 // rows)
    started = time.perf_counter()
    for _ in range(repeats):
        for layer in range(layers):
            call(layer)
    return (time.perf_counter() - started) / repeats / layers * 1e3


def _onednn_call(x: Any, packed: list[Any], layer: int) -> object:
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, packed[layer], None, "none", [], "")


def _blocked_call(x: Any, blocked: list[Any], layer: int) -> object:
    from workers.layers import cpu_gemm

    return cpu_gemm.packed_linear(x, blocked[layer], None)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    from workers.kernels import cpu as cpu_kernels
    from workers.layers import cpu_gemm

    torch.set_num_threads(args.threads)
    if cpu_kernels.library() is None or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        sys.exit("needs the kernel library (a C++ compiler) and torch with oneDNN")
    title = (f"float32 linear, {args.threads} thread(s), {args.layers} weights per shape cycled, "
             f"{torch.backends.cpu.get_cpu_capability()}, mean ms per call")
    lines = [title, "",
             "| weight (out x in) | rows | oneDNN (ms) | blocked (ms) | speed-up |", "|---|---:|---:|---:|---:|"]
    for shape in args.shapes:
        out_features, in_features = map(int, shape.split("x"))
        weights = [torch.randn(out_features, in_features) * 0.02 for _ in range(args.layers)]
        onednn = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
        blocked = [cpu_gemm.BlockedWeight.of(cpu_kernels.block_weight(w), out_features) for w in weights]
        for rows in args.rows:
            x = torch.randn(rows, in_features)
            ours = cpu_gemm.packed_linear(x, blocked[0], None)
            torch.testing.assert_close(ours, F.linear(x, weights[0]), rtol=1e-4, atol=1e-4)
            onednn_ms = _mean_ms(functools.partial(_onednn_call, x, onednn), args.layers, rows)
            blocked_ms = _mean_ms(functools.partial(_blocked_call, x, blocked), args.layers, rows)
            lines.append(f"| {shape} | {rows} | {onednn_ms:.3f} | {blocked_ms:.3f} | {onednn_ms / blocked_ms:.2f}x |")
            print(f"[bench_gemm] {shape} x {rows} rows done", file=sys.stderr, flush=True)
    table = "\n".join(lines)
    print(table)
    if args.result_md is not None:
        args.result_md.write_text(table + "\n")


if __name__ == "__main__":
    main()
