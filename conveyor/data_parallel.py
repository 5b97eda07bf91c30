"""Where each data-parallel engine core listens, and where frontends and other hosts' engines find rank 0.

```
 all engines on this host, with HTTP    every address ipc://  (nothing leaves the host)
 --headless, or some engines elsewhere  rank 0: tcp://DATA_PARALLEL_ADDRESS:DATA_PARALLEL_RPC_PORT
                                        rank r: tcp://<this host's address towards rank 0>:<free port>
```
Ranks other than 0 register their address with rank 0; frontends learn every address from rank 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import socket

from engine_core.config import EngineConfig
from engine_core.process_utils import free_tcp_port, new_ipc_address


@dataclasses.dataclass(frozen=True)
class DataParallelPlan:
    front_door_address: str  # data-parallel rank 0: where frontends (and other ranks) connect
    local_engines: list[EngineConfig]  # one per engine core this host runs


def plan_data_parallel(args: argparse.Namespace, base: EngineConfig) -> DataParallelPlan:
    size = args.data_parallel_size
    local = args.data_parallel_size_local if args.data_parallel_size_local is not None else size - \
        args.data_parallel_start_rank
    first = args.data_parallel_start_rank
    if size < 1 or local < 1 or first < 0 or first + local > size:
        raise SystemExit(f"data parallel: ranks {first}..{first + local - 1} do not fit in "
                         f"--data-parallel-size {size}")
    over_tcp = args.headless or local < size
    if over_tcp:
        front_door = f"tcp://{args.data_parallel_address}:{args.data_parallel_rpc_port}"
        own_host = _address_towards(args.data_parallel_address)
    else:
        front_door = new_ipc_address("engine0")
    engines = []
    for rank in range(first, first + local):
        if rank == 0:
            address = front_door
        elif over_tcp:
            address = f"tcp://{own_host}:{free_tcp_port(own_host)}"
        else:
            address = new_ipc_address(f"engine{rank}")
        engines.append(dataclasses.replace(
            base, engine_address=address, dp_master_address="" if rank == 0 else front_door,
            parallel=dataclasses.replace(base.parallel, data_parallel_rank=rank)))
    return DataParallelPlan(front_door, engines)


def _address_towards(host: str) -> str:
    """This host's IP on the route to `host` (what another host's frontend can reach us at)."""
    if host in ("0.0.0.0", "", "*"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, 9))  # UDP connect sends nothing; it only picks the route
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"
