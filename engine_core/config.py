"""Frozen configs, one per concern, composed into `EngineConfig`.

Each component takes only the sub-config it reads. Values found at run time (the number of KV blocks) come
back through the worker handshake instead of being patched in here. Nothing here imports torch: the frontend
and the launcher read these too.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how to present it. `model` is a Hugging Face folder or a `.gguf` file."""

    model: str
    served_model_name: str
    tokenizer_dir: str  # folder with tokenizer.json / tokenizer_config.json (made from GGUF metadata if needed)
    architecture: str  # e.g. "LlamaForCausalLM"
    dtype: str = "float32"  # resolved: float32 | bfloat16 | float16
    max_model_len: int = 2048
    seed: int = 0
    eos_token_ids: tuple[int, ...] = ()
    generation_config: str = "auto"  # "auto" (model folder) | "vllm" (engine defaults) | a folder
    chat_template: str | None = None  # --chat-template: a file path or the template itself


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None  # CPU: None = 4 GiB, or 40% of free RAM if less
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of device memory for weights + activations + KV
    enable_prefix_caching: bool = True
    num_blocks_override: int | None = None  # --num-gpu-blocks-override: fixed block count (tests)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int = 2048
    policy: str = "fcfs"  # "fcfs" | "priority"
    enable_chunked_prefill: bool = True


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    num_threads: int | None = None  # torch intra-op threads per worker; None = OMP_NUM_THREADS or torch's default
    distributed_init_port: int = 0  # 0 = pick a free port at start-up


@dataclass(frozen=True)
class FrontendConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    api_server_count: int = 1
    uvicorn_log_level: str = "warning"


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    engine_address: str = ""  # ZeroMQ address frontends connect to, e.g. ipc:///tmp/conveyor-xyz/engine


_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
               "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_byte_size(text: str) -> int:
    """'2GiB' -> 2147483648, '500MB' -> 500000000, '1048576' -> 1048576."""
    cleaned = text.strip().lower().replace(" ", "")
    number = cleaned.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = cleaned[len(number):]
    if not number or unit not in _SIZE_UNITS:
        raise ValueError(f"cannot read {text!r} as a size in bytes (examples: 2GiB, 512MiB, 1000000)")
    return int(float(number) * _SIZE_UNITS[unit])
