"""Per-collective time of tensor-parallel all-reduce between ranks on this host: gloo (TCP loopback) against
Conveyor's shared-memory transport (workers/distributed/shm_comm.py), on the same tensors in the same run.

    python scripts/bench_allreduce.py [--world 2] [--hidden 576] [--tokens 1 16 64 2048] [--iterations 200]
                                      [--threads 1] [--result-md FILE]

Each size is `tokens x hidden` float32, the all-reduce a row-parallel layer makes (two per decoder layer). Ranks
run as separate processes with `--threads` torch threads each, as `conveyor serve -tp N` runs its workers.
Prints a markdown table of the median microseconds per call.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2, help="number of ranks (processes)")
    parser.add_argument("--hidden", type=int, default=576, help="row width (SmolLM2-135M: 576)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 2048], help="rows per all-reduce")
    parser.add_argument("--iterations", type=int, default=200, help="timed calls per size and transport")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--result-md", type=Path, default=None, help="also write the table here")
    return parser.parse_args(argv)


def _rank(rank: int, args: argparse.Namespace, port: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from workers.distributed.shm_comm import ShmCommunicator

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world)
    shm = ShmCommunicator.create(rank, args.world)
    transports = {"gloo": dist.all_reduce}
    if shm is not None:
        transports["shared memory"] = shm.all_reduce_
    lines = []
    for tokens in args.tokens:
        x = torch.randn(tokens, args.hidden)
        medians = {}
        for name, all_reduce in transports.items():
            for _ in range(10):
                all_reduce(x)
            times = []
            for _ in range(args.iterations):
                started = time.perf_counter()
                all_reduce(x)
                times.append(time.perf_counter() - started)
            medians[name] = statistics.median(times) * 1e6
        shm_us = medians.get("shared memory")
        speedup = f"{medians['gloo'] / shm_us:.1f}x" if shm_us else "n/a"
        lines.append(f"| {tokens} x {args.hidden} | {tokens * args.hidden * 4 / 1024:.1f} | {medians['gloo']:.1f} | "
                     f"{f'{shm_us:.1f}' if shm_us else 'unavailable'} | {speedup} |")
        if rank == 0:
            print(f"[bench_allreduce] {tokens} x {args.hidden} done", file=sys.stderr, flush=True)
    if rank == 0:
        Path(out_dir, "table.md").write_text("\n".join(lines) + "\n")
    dist.barrier()
    os._exit(0)  # skip gloo's teardown, which can abort a rank whose peer left first


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank, args=(args, port, out_dir), nprocs=args.world)
        rows = Path(out_dir, "table.md").read_text()
    table = (f"all-reduce, {args.world} ranks on one host, {args.threads} torch thread(s) each, median of "
             f"{args.iterations} calls\n\n| tensor (float32) | KiB | gloo (us) | shared memory (us) | speed-up |\n"
             f"|---|---:|---:|---:|---:|\n{rows}")
    print(table)
    if args.result_md:
        args.result_md.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
