"""Collectives through one shared memory segment for tensor-parallel ranks on the same host (CPU, float32).

Set up once, collectively, after torch.distributed: rank 0 creates a file in /dev/shm (reserved with fallocate, so
a full tmpfs fails here and not later with SIGBUS), every rank maps it, writes its pid, and after a barrier rank 0
unlinks it, so nothing outlives the group. The ranks agree on the outcome: when any rank cannot take part (other
host, no compiler for the kernels library, no room in /dev/shm) every rank keeps torch.distributed.
The calls themselves are in workers/kernels/shm_collectives.cpp.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from workers.kernels import cpu as cpu_kernels

logger = logging.getLogger("conveyor.tensor_parallel")

HEADER_LINE_BYTES = 64  # one cache line per rank: [announced sequence, pid]
DEFAULT_SLOT_BYTES = 4 << 20  # per rank and parity; larger collectives go in chunks


class PeerDiedError(RuntimeError):
    pass


def _host_id() -> str:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    return f"{socket.gethostname()}/{boot_id}"


def _segment_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _all_ranks_agree(ok: bool, world: int) -> bool:
    votes: list[bool | None] = [None] * world
    dist.all_gather_object(votes, ok)
    return all(votes)


class ShmCommunicator:
    def __init__(self, segment: torch.Tensor, world: int, rank: int, slot_bytes: int) -> None:
        self.segment, self.world, self.rank, self.slot_bytes = segment, world, rank, slot_bytes
        self.sequence = 0  # calls (chunks) this group has made: the barrier's counter
        library = cpu_kernels.library()
        assert library is not None, "create() only builds a communicator where the kernel library loaded"
        self._lib = library

    @classmethod
    def create(cls, rank: int, world: int, slot_bytes: int = DEFAULT_SLOT_BYTES) -> ShmCommunicator | None:
        """Collective over the default process group; None on every rank when any rank cannot take part."""
        hosts: list[str | None] = [None] * world
        dist.all_gather_object(hosts, _host_id())
        if not _all_ranks_agree(len(set(hosts)) == 1 and cpu_kernels.library() is not None, world):
            return None
        size = world * HEADER_LINE_BYTES + 2 * world * slot_bytes
        path = [""]
        if rank == 0:
            path[0] = os.path.join(_segment_dir(), f"conveyor-tp-{os.getpid()}-{secrets.token_hex(4)}")
            try:
                fd = os.open(path[0], os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                try:
                    os.posix_fallocate(fd, 0, size)
                finally:
                    os.close(fd)
            except OSError as exc:
                logger.warning("no shared memory segment for tensor parallel (%s): collectives use gloo", exc)
                path[0] = ""
        dist.broadcast_object_list(path, src=0)
        segment = None
        if path[0]:
            try:
                segment = torch.from_file(path[0], shared=True, size=size, dtype=torch.uint8)
                pid_offset = rank * HEADER_LINE_BYTES + 8
                segment[pid_offset: pid_offset + 8].view(torch.int64)[0] = os.getpid()
            except (OSError, RuntimeError) as exc:
                logger.warning("cannot map the tensor-parallel segment %s (%s): collectives use gloo", path[0], exc)
                segment = None
        agreed = _all_ranks_agree(segment is not None, world)  # also the barrier before the unlink
        if rank == 0 and path[0]:
            os.unlink(path[0])
        return cls(segment, world, rank, slot_bytes) if agreed and segment is not None else None

    def all_reduce_(self, x: torch.Tensor) -> None:
        """Sum of x over the ranks, in place (contiguous float32 CPU); every rank gets the same bits."""
        self._check(self._lib.shm_all_reduce_f32(self.segment.data_ptr(), self.world, self.rank, self.slot_bytes,
                                                 self.sequence, x.data_ptr(), x.numel()))

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[world, *x.shape]: every rank's contiguous x, in rank order."""
        out = torch.empty((self.world, *x.shape), dtype=x.dtype)
        self._check(self._lib.shm_all_gather(self.segment.data_ptr(), self.world, self.rank, self.slot_bytes,
                                             self.sequence, x.data_ptr(), out.data_ptr(), x.numel() * x.element_size()))
        return out

    def native_fields(self) -> torch.Tensor:
        """[segment address, world, rank, slot bytes, sequence] int64, for C++ code that runs this group's all-reduces
        itself (workers/kernels/decoder_stack.cpp); hand the tensor back to `adopt_native_fields` afterwards."""
        return torch.tensor([self.segment.data_ptr(), self.world, self.rank, self.slot_bytes, self.sequence],
                            dtype=torch.int64)

    def adopt_native_fields(self, fields: torch.Tensor) -> None:
        """Take the sequence count the C++ calls advanced (raises PeerDiedError if one found a dead rank)."""
        self._check(int(fields[4]))

    def _check(self, sequence: int) -> None:
        if sequence < 0:
            raise PeerDiedError(f"tensor-parallel rank {-sequence - 1} died during a collective")
        self.sequence = sequence
