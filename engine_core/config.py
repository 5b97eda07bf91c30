"""Frozen configs, one per concern, composed into `EngineConfig`.

Each component takes only the sub-config it reads. Values found at run time (the number of KV blocks) come
back through the worker handshake instead of being patched in here. Nothing here imports torch: the frontend
and the launcher read these too.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any


RUNNERS = ("generate", "pooling")
CONVERSIONS = ("none", "embed", "classify")
POOLING_TYPES = ("CLS", "MEAN", "LAST")


@dataclass(frozen=True)
class PoolerConfig:
    """How a pooling model turns a prompt's hidden states into its result; resolved once at start-up from the
    checkpoint (config.json, sentence-transformers' modules.json and 1_Pooling/config.json) and --pooler-config."""

    pooling_type: str = "MEAN"  # CLS | MEAN | LAST: which rows make the sequence vector
    normalize: bool = True  # embed: L2-normalize unless a request says otherwise
    embedding_size: int = 0  # values in one embedding (the hidden size)
    num_labels: int = 0  # > 0: a classification head (1 = a cross-encoder's relevance score)
    id2label: dict[int, str] = field(default_factory=dict)
    classifier_activation: str = "softmax"  # "softmax" | "sigmoid" (one label, or multi-label classification)
    is_matryoshka: bool = False  # requests may shorten embeddings with `dimensions`
    matryoshka_dimensions: tuple[int, ...] = ()  # the `dimensions` allowed (empty: any up to embedding_size)

    @property
    def tasks(self) -> tuple[str, ...]:
        """The pooling tasks (protocol.POOLING_TASKS) this model serves."""
        if self.num_labels:
            return ("classify", "token_classify") + (("score",) if self.num_labels == 1 else ())
        return ("embed", "token_embed")


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how to present it. `model` is a Hugging Face folder or a `.gguf` file."""

    model: str
    served_model_name: str
    tokenizer_dir: str  # folder with tokenizer.json / tokenizer_config.json (made from GGUF metadata if needed)
    architecture: str  # e.g. "LlamaForCausalLM"
    dtype: str = "float32"  # resolved: float32 | bfloat16 | float16 (the activations' type)
    quantization: str = "none"  # resolved --quantization: none | gguf | int8 | int4 (workers/layers/quantized.py)
    max_model_len: int = 2048
    seed: int = 0
    eos_token_ids: tuple[int, ...] = ()
    generation_config: str = "auto"  # "auto" (model folder) | "vllm" (engine defaults) | a folder
    chat_template: str | None = None  # --chat-template: a file path or the template itself
    # Frontends only: the logits processor names the engine's workers registered (from the engine's ModelInfo).
    logits_processors: tuple[str, ...] = ()
    runner: str = "generate"  # RUNNERS: "pooling" serves embeddings / classification / scores instead of text
    convert: str = "none"  # CONVERSIONS: serve a generative checkpoint as a pooling model ("embed" | "classify")
    pooler: PoolerConfig | None = None  # set exactly when runner == "pooling"
    score_template: str | None = None  # --score-template: Jinja text rendering a (query, document) pair


KV_CONNECTORS = ("ZmqPullConnector", "SharedStorageConnector")
KV_ROLES = ("kv_producer", "kv_consumer", "kv_both")
KV_LOAD_FAILURE_POLICIES = ("recompute", "fail")


@dataclass(frozen=True)
class KVTransferConfig:
    """--kv-transfer-config: how this instance hands prompt KV to (producer) or takes it from (consumer) others."""

    kv_connector: str
    kv_role: str = "kv_both"
    kv_ip: str = "127.0.0.1"  # producer: the address consumers pull from (must be reachable from them)
    kv_port: int = 14579  # producer: tensor-parallel rank r of data-parallel rank d listens on kv_port + d*tp + r
    engine_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    kv_load_failure_policy: str = "recompute"  # consumer: "recompute" the prompt or "fail" the request
    kv_connector_extra_config: dict[str, Any] = field(default_factory=dict)

    @property
    def is_producer(self) -> bool:
        return self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.kv_role in ("kv_consumer", "kv_both")

    @property
    def lease_s(self) -> float:
        """How long a producer keeps a finished request's blocks for a consumer that has not pulled them."""
        return float(self.kv_connector_extra_config.get("lease_s", 120.0))

    @property
    def transfer_timeout_s(self) -> float:
        """How long a consumer waits for a producer (pull) or for the KV files (shared storage)."""
        return float(self.kv_connector_extra_config.get("transfer_timeout_s", 30.0))

    @classmethod
    def from_json(cls, text: str) -> KVTransferConfig:
        """Parse and check the --kv-transfer-config JSON; ValueError names the bad key."""
        raw = parse_json_object(text, "--kv-transfer-config")
        extra = dict(raw.get("kv_connector_extra_config") or {})
        known = {"kv_connector", "kv_role", "kv_ip", "kv_port", "engine_id", "kv_load_failure_policy",
                 "kv_connector_extra_config"}
        # vLLM also accepts these; they carry no meaning for Conveyor's connectors.
        ignored = {"kv_buffer_device", "kv_buffer_size", "kv_rank", "kv_parallel_size", "kv_connector_module_path"}
        unknown = set(raw) - known - ignored
        if unknown:
            raise ValueError(f"--kv-transfer-config: unknown key(s) {sorted(unknown)}")
        policy = raw.get("kv_load_failure_policy", extra.pop("kv_load_failure_policy", "recompute"))
        config = cls(kv_connector=str(raw.get("kv_connector", "")), kv_role=str(raw.get("kv_role", "kv_both")),
                     kv_ip=str(raw.get("kv_ip", "127.0.0.1")), kv_port=int(raw.get("kv_port", 14579)),
                     engine_id=str(raw.get("engine_id") or uuid.uuid4().hex), kv_load_failure_policy=str(policy),
                     kv_connector_extra_config=extra)
        for name, value, allowed in (("kv_connector", config.kv_connector, KV_CONNECTORS),
                                     ("kv_role", config.kv_role, KV_ROLES),
                                     ("kv_load_failure_policy", config.kv_load_failure_policy,
                                      KV_LOAD_FAILURE_POLICIES)):
            if value not in allowed:
                raise ValueError(f"--kv-transfer-config: {name} {value!r} is not one of {', '.join(allowed)}")
        if config.kv_connector == "SharedStorageConnector" and not extra.get("shared_storage_path"):
            raise ValueError("--kv-transfer-config: SharedStorageConnector needs "
                             "kv_connector_extra_config.shared_storage_path")
        return config


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    cache_dtype: str = "auto"  # --kv-cache-dtype: "auto" (the model's dtype) | "float32" | "bfloat16" | "float16"
    kv_cache_memory_bytes: int | None = None  # CPU: None = 4 GiB, or 40% of free RAM if less
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of device memory for weights + activations + KV
    enable_prefix_caching: bool = True
    num_blocks_override: int | None = None  # --num-gpu-blocks-override: fixed block count (tests)
    kv_transfer: KVTransferConfig | None = None  # --kv-transfer-config: disaggregated prefill/decode


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int = 2048
    policy: str = "fcfs"  # "fcfs" | "priority"
    enable_chunked_prefill: bool = True
    pooling_tasks: tuple[str, ...] = ()  # a pooling runner: the tasks it serves (generation requests are refused)
    # Media encoder (`engine_core.encoder_cache`): rows one step may encode, and rows the workers keep; 0 = as
    # many as max_num_batched_tokens (vLLM's defaults)
    max_num_encoder_input_tokens: int = 0
    max_waiting_requests: int = 0  # --max-waiting-requests: refuse new requests past this queue length (0: no bound)
    encoder_cache_size: int = 0


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    num_threads: int | None = None  # torch intra-op threads per worker; None = OMP_NUM_THREADS or torch's default
    distributed_init_port: int = 0  # 0 = pick a free port at start-up
    distributed_executor_backend: str = "mp"  # "mp": local worker processes | "ray": Ray actors (multi-node)
    data_parallel_size: int = 1  # engine cores behind the same frontends
    data_parallel_rank: int = 0  # this engine core's rank; rank 0 is the one frontends contact first


@dataclass(frozen=True)
class FrontendConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | tuple[str, ...] | None = None  # --api-key: one or several keys (VLLM_API_KEY when none)
    api_server_count: int = 1
    uvicorn_log_level: str = "warning"
    metrics_require_api_key: bool = False  # --metrics-require-api-key: /metrics behind the key too
    ssl_keyfile: str | None = None  # --ssl-keyfile/--ssl-certfile: serve HTTPS
    ssl_certfile: str | None = None
    ssl_ca_certs: str | None = None  # --ssl-ca-certs: CA bundle for client certificates
    ssl_cert_reqs: int = 0  # --ssl-cert-reqs: ssl.CERT_NONE (0), CERT_OPTIONAL (1), CERT_REQUIRED (2)
    root_path: str | None = None  # --root-path: the prefix a path-based proxy serves the API under
    allowed_origins: tuple[str, ...] = ("*",)  # CORS (--allowed-origins/-methods/-headers, --allow-credentials)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    enable_log_requests: bool = False  # --enable-log-requests: one log line per engine request
    max_log_len: int | None = None  # --max-log-len: prompt characters / token ids shown in that line
    disable_uvicorn_access_log: bool = False
    enable_request_id_headers: bool = False  # --enable-request-id-headers: X-Request-Id on every response
    enable_force_include_usage: bool = False  # --enable-force-include-usage: usage in every stream
    max_request_body_mb: float = 128.0  # --max-request-body-mb: 413 past this (0: no limit)
    enable_auto_tool_choice: bool = False  # tool_choice "auto" parses calls out of the output (needs a parser)
    tool_call_parser: str | None = None  # --tool-call-parser: a name registered in frontend.generate.tool_parsers
    exclude_tools_when_tool_choice_none: bool = False  # tool_choice "none": keep tools out of the chat template
    trust_request_chat_template: bool = False  # accept a request's own `chat_template` (vLLM refuses it by default)
    allowed_local_media_path: str | None = None  # file:// media only from inside this folder (none: no file:// at all)
    allowed_media_domains: tuple[str, ...] | None = None  # http(s) media only from these hosts (None: any host)
    limit_mm_per_prompt: dict[str, int] = field(default_factory=dict)  # modality -> most items in one prompt
    mm_processor_kwargs: dict[str, Any] = field(default_factory=dict)  # --mm-processor-kwargs: request defaults
    media_io_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # --media-io-kwargs: modality -> options
    enable_mm_embeds: bool = False  # --enable-mm-embeds: accept precomputed image embeddings (image_embeds parts)
    mm_processor_cache_gb: float = 4.0  # --mm-processor-cache-gb: processed media kept per frontend (0: none)
    shutdown_timeout_s: float = 0.0  # --shutdown-timeout: how long in-flight requests may finish after SIGTERM


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    engine_address: str = ""  # ZeroMQ address frontends connect to, e.g. ipc:///tmp/conveyor-xyz/engine
    dp_master_address: str = ""  # data-parallel rank > 0: rank 0's engine_address, where this core registers
    log_stats: bool = True  # the core's periodic throughput line (off: --disable-log-stats)


def parse_json_object(text: str, flag: str) -> dict[str, Any]:
    """A flag's JSON object value; ValueError names the flag."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object")
    return value


def read_text_or_file(value: str | None) -> str | None:
    """A flag that takes a file path or the text itself (--chat-template, --score-template): the text."""
    if value is None:
        return None
    try:
        path = Path(value)
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except OSError:  # long text is not a valid path
        pass
    return value


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
