"""This worker's tensor-parallel group: its collectives (tensor_parallel.py) and the shared-memory transport for ranks
on one host (shm_comm.py)."""
