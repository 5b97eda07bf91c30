"""Shared-memory collectives between tensor-parallel ranks on one host, against gloo's on the same tensors.

Slots of 256 bytes force every collective above 64 floats into chunks (the two-parity barrier is exercised many
times per call). Two ranks must match gloo bit for bit (a + b either way); three, within float32 rounding of a
different summation order; every rank must get the same bits.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workers.distributed.shm_comm import PeerDiedError, ShmCommunicator
from workers.kernels import cpu as cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C++ compiler: no shared-memory collectives")
SIZES = [1, 63, 64, 65, 1000, 4099]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _collectives(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    comm = ShmCommunicator.create(rank, world, slot_bytes=256)
    assert comm is not None
    results = {}
    for size in SIZES:
        torch.manual_seed(size * 10 + rank)
        x = torch.randn(size)
        shm_sum, gloo_sum = x.clone(), x.clone()
        comm.all_reduce_(shm_sum)
        dist.all_reduce(gloo_sum)
        same_everywhere = [torch.empty_like(shm_sum) for _ in range(world)]
        dist.all_gather(same_everywhere, shm_sum)
        gathered = comm.all_gather(x.view(1, size))  # [world, 1, size]
        expected = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(expected, x)
        results[size] = (shm_sum, gloo_sum, same_everywhere, gathered, torch.stack(expected).unsqueeze(1))
    if rank == 0:
        torch.save(results, os.path.join(out_dir, f"world{world}.pt"))
    dist.barrier()
    os._exit(0)  # skip gloo's teardown (see tests/workers/test_model_runner.py)


@pytest.mark.parametrize("world", [2, 3])
def test_all_reduce_and_all_gather_match_gloo(tmp_path: Path, world: int) -> None:
    segments_before = _segments()
    mp.spawn(_collectives, args=(world, _free_port(), str(tmp_path)), nprocs=world)
    results = torch.load(tmp_path / f"world{world}.pt")
    for size, (shm_sum, gloo_sum, same_everywhere, gathered, expected_gather) in results.items():
        if world == 2:
            assert torch.equal(shm_sum, gloo_sum), size
        else:
            torch.testing.assert_close(shm_sum, gloo_sum, rtol=1e-6, atol=1e-6)
        assert all(torch.equal(shm_sum, other) for other in same_everywhere), size
        assert torch.equal(gathered, expected_gather), size
    assert _segments() == segments_before  # rank 0 unlinked the segment once every rank had mapped it


def _segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("conveyor-tp-")} if os.path.isdir(
        "/dev/shm") else set()


def _peer_dies(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    comm = ShmCommunicator.create(rank, 2)
    assert comm is not None
    comm.all_reduce_(torch.ones(8))  # both ranks alive: one call goes through
    if rank == 1:
        os._exit(0)
    try:
        comm.all_reduce_(torch.ones(8))
    except PeerDiedError as exc:
        Path(out_dir, "error.txt").write_text(str(exc))
    os._exit(0)


def test_a_dead_peer_fails_the_collective_instead_of_hanging(tmp_path: Path) -> None:
    mp.spawn(_peer_dies, args=(_free_port(), str(tmp_path)), nprocs=2)
    assert (tmp_path / "error.txt").read_text() == "tensor-parallel rank 1 died during a collective"
