"""The flags of `conveyor serve` and `conveyor frontend`: names follow `vllm serve`, so a vLLM command line works
unchanged. Turning parsed flags into configs is `conveyor/config_from_args.py`."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from engine_core.config import KVTransferConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description="OpenAI-compatible LLM inference server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model (default: the embedded SmolLM2-135M-Instruct)")
    serve.add_argument("model", nargs="?", default=None, help="Hugging Face folder or .gguf file")
    serve.add_argument("--model", dest="model_flag", default=None, help=argparse.SUPPRESS)
    serve.add_argument("--headless", action="store_true",
                       help="run the engine (core + workers) only, no HTTP; frontends connect with "
                            "`conveyor frontend --engine-address tcp://DATA_PARALLEL_ADDRESS:DATA_PARALLEL_RPC_PORT`")
    _add_frontend_flags(serve)
    _add_model_flags(serve)
    _add_engine_flags(serve)
    _add_scale_out_flags(serve)
    frontend = commands.add_parser("frontend", help="run API servers for an engine started elsewhere "
                                                    "(`conveyor serve --headless`)")
    frontend.add_argument("--engine-address", required=True,
                          help="ZeroMQ address of the engine (data-parallel rank 0), e.g. tcp://10.0.0.5:29550")
    _add_frontend_flags(frontend)
    return parser


def _add_frontend_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of one API server, shared by `conveyor serve` and `conveyor frontend`, grouped by topic."""
    _add_http_flags(parser)
    _add_auth_flags(parser)
    _add_logging_flags(parser)
    group = parser.add_argument_group("OpenAI API")
    group.add_argument("--enable-force-include-usage", action="store_true",
                       help="send usage in every streamed completion/chat answer, even without "
                            "stream_options.include_usage")
    group.add_argument("--enable-auto-tool-choice", action="store_true",
                       help='tool_choice "auto" (the default when a request has tools): parse tool calls out of '
                            "the output with --tool-call-parser")
    group.add_argument("--tool-call-parser", default=None,
                       help="the model's tool call syntax: hermes, llama3_json or pythonic")
    group.add_argument("--exclude-tools-when-tool-choice-none", action="store_true",
                       help='with tool_choice "none", do not pass the tools to the chat template')
    group.add_argument("--trust-request-chat-template", action="store_true",
                       help="accept a chat_template in requests (templates run sandboxed, but a client could still "
                            "send one that renders for a very long time)")
    group = parser.add_argument_group("multimodal")
    group.add_argument("--allowed-local-media-path", default=None,
                       help="a folder requests may read images from with file:// URLs (symlinks resolved; nothing "
                            "outside it); without it file:// URLs are refused")
    group.add_argument("--allowed-media-domains", nargs="+", default=None,
                       help="hosts requests may fetch http(s) images from (redirects out of them are refused); "
                            "default: any host")
    group.add_argument("--limit-mm-per-prompt", default="{}",
                       help='most media items per prompt, as JSON: \'{"image": 4}\' (default 999 per modality)')
    group.add_argument("--mm-processor-kwargs", default="{}",
                       help='defaults for requests\' mm_processor_kwargs, as JSON: \'{"max_pixels": 401408}\'')
    group.add_argument("--enable-mm-embeds", action="store_true",
                       help="accept image_embeds parts (precomputed image embeddings, base64 of torch.save); "
                            "trusted clients only: they bypass the vision encoder")
    group.add_argument("--mm-processor-cache-gb", type=float, default=4.0,
                       help="GiB of processed images/videos each API server keeps, so a repeated item is decoded "
                            "and resized once (0: off)")
    group.add_argument("--media-io-kwargs", default="{}",
                       help='defaults for requests\' media_io_kwargs, as JSON: \'{"video": {"num_frames": 8}}\'')


def _add_http_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("HTTP server")
    group.add_argument("--host", default="127.0.0.1")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--api-server-count", type=int, default=1, help="frontend processes sharing the port")
    group.add_argument("--shutdown-timeout", type=float, default=0.0,
                       help="seconds in-flight requests may run on after SIGTERM/SIGINT before they are aborted "
                            "(/health and new requests answer 503 meanwhile; 0: abort at once, as vLLM)")
    group.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key (PEM)")
    group.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate chain (PEM); with --ssl-keyfile")
    group.add_argument("--ssl-ca-certs", default=None, help="CA certificates to verify client certificates with")
    group.add_argument("--ssl-cert-reqs", type=int, default=0,
                       help="client certificates: 0 not asked (ssl.CERT_NONE), 1 optional, 2 required")
    group.add_argument("--root-path", default=None,
                       help="the path prefix a path-based proxy serves the API under (FastAPI root_path)")
    group.add_argument("--allowed-origins", type=_json_list("--allowed-origins"), default=["*"],
                       help='CORS: origins allowed, as a JSON list (default ["*"])')
    group.add_argument("--allowed-methods", type=_json_list("--allowed-methods"), default=["*"],
                       help='CORS: methods allowed, as a JSON list (default ["*"])')
    group.add_argument("--allowed-headers", type=_json_list("--allowed-headers"), default=["*"],
                       help='CORS: request headers allowed, as a JSON list (default ["*"])')
    group.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    group.add_argument("--max-request-body-mb", type=float, default=128.0,
                       help="answer 413 to a request body over this many MiB, before buffering it; inline base64 "
                            "media count (0: no limit)")
    group.add_argument("--enable-request-id-headers", action="store_true",
                       help="answer every request with an X-Request-Id header (the client's own, or a new one)")


def _add_auth_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("authentication")
    group.add_argument("--api-key", nargs="+", action="extend", default=None,
                       help="require 'Authorization: Bearer KEY' on every route but /health, /version, "
                            "/openapi.json and /metrics; several keys may be given (default: VLLM_API_KEY)")
    group.add_argument("--metrics-require-api-key", action="store_true",
                       help="with --api-key, require the key on /metrics too")


def _add_logging_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument("--uvicorn-log-level", default="warning",
                       choices=["critical", "error", "warning", "info", "debug", "trace"])
    group.add_argument("--disable-uvicorn-access-log", action="store_true",
                       help="no access log line per HTTP request (shown at --uvicorn-log-level info or lower)")
    group.add_argument("--enable-log-requests", action="store_true",
                       help="log each engine request: id, prompt (up to --max-log-len) and sampling parameters")
    group.add_argument("--disable-log-requests", action="store_true",
                       help=argparse.SUPPRESS)  # older vLLM spelling of the default
    group.add_argument("--max-log-len", type=int, default=None,
                       help="prompt characters and token ids shown by --enable-log-requests (default: all)")
    group.add_argument("--disable-log-stats", action="store_true",
                       help="no periodic throughput line from the engine")


def _json_list(flag: str) -> Callable[[str], list[str]]:
    """vLLM's JSON list value ('["http://a.example", "http://b.example"]'); a bare word is a list of one."""
    def parse(text: str) -> list[str]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return [text]
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise argparse.ArgumentTypeError(f"{flag} takes a JSON list of strings, got {text!r}")
        return value

    return parse


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--tokenizer", default=None)
    group.add_argument("--served-model-name", nargs="+", default=None)
    group.add_argument("--chat-template", default=None, help="a Jinja2 template file or the template itself")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "float", "bfloat16", "bf16",
                                                           "float16", "half", "fp16"])
    group.add_argument("--quantization", "-q", default=None, choices=["auto", "gguf", "int8", "int4", "none"],
                       help="weights kept quantized in memory and run through weight-only quantized matmuls with "
                            "--dtype activations: 'gguf' (the default for a .gguf file: its Q8_0/Q4_0/Q4_1/Q4_K/Q5_K/"
                            "Q6_K tensors stay quantized), 'int8' (per output channel) or 'int4' (groups of 32) of a "
                            "float checkpoint at load time (Conveyor's names), 'none' (float weights; a GGUF is "
                            "dequantized at load)")
    group.add_argument("--max-model-len", type=int, default=None)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--generation-config", default="auto",
                       help="'auto' (model folder), 'vllm' (engine defaults) or a folder")
    group.add_argument("--trust-remote-code", action="store_true", help="accepted for vLLM compatibility")
    group.add_argument("--enforce-eager", action="store_true",
                       help="accepted for vLLM compatibility: Conveyor's forward always runs eagerly (no graphs)")
    group.add_argument("--runner", choices=["auto", "generate", "pooling"], default="auto",
                       help="generate text, or pool (embeddings, classification, scores); auto: pooling for "
                            "encoders, *ForSequenceClassification and sentence-transformers folders")
    group.add_argument("--convert", choices=["auto", "none", "embed", "classify"], default="auto",
                       help="serve a generative checkpoint as a pooling model (last-token pooling)")
    group.add_argument("--pooler-config", default=None,
                       help='override the pooling, e.g. \'{"pooling_type": "MEAN", "normalize": false}\'')
    group.add_argument("--score-template", default=None,
                       help="a Jinja2 template file (or the template itself) rendering a query/document pair "
                            "(messages with roles 'query' and 'document') into one prompt for /score and /rerank")
    group.add_argument("--task", choices=["auto", "generate", "embed", "embedding", "classify", "score"],
                       default="auto", help=argparse.SUPPRESS)  # older vLLM spelling of --runner/--convert


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--block-size", type=int, default=16)
    group.add_argument("--kv-cache-dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                       help="dtype of the KV cache: auto = the model's dtype; bfloat16 halves a float32 model's "
                            "KV memory (keys and values rounded to bfloat16)")
    group.add_argument("--kv-cache-memory", "--kv-cache-memory-bytes", dest="kv_cache_memory", default=None,
                       help="KV cache size on CPU, e.g. 2GiB (default: 4GiB, or 40%% of free RAM if less)")
    group.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    group.add_argument("--num-gpu-blocks-override", type=int, default=None)
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    group.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    group.add_argument("--max-num-batched-tokens", type=int, default=None)
    group.add_argument("--max-num-seqs", type=int, default=None,
                       help="requests in one step at most (default 256; 64 for speech models, whose requests each "
                            "hold the encoder's cross-attention keys and values)")
    group.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs")
    group.add_argument("--max-waiting-requests", type=int, default=0,
                       help="refuse new requests with 503 + Retry-After while this many wait in the engine's "
                            "queue (default 0: no bound)")
    group.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    group.add_argument("--distributed-executor-backend", choices=["mp", "ray"], default="mp",
                       help="mp: one local process per tensor-parallel rank; ray: Ray actors in a placement group "
                            "(RAY_ADDRESS or a running `ray start` cluster, else a local Ray), so ranks can "
                            "span nodes")


def _add_scale_out_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scale-out")
    group.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    group.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                       help="engine cores (each with its own workers) behind the same frontends")
    group.add_argument("--data-parallel-size-local", "-dpl", type=int, default=None,
                       help="how many of those run on this host (default: all)")
    group.add_argument("--data-parallel-start-rank", "-dpr", type=int, default=0,
                       help="data-parallel rank of this host's first engine (engines joining from another host)")
    group.add_argument("--data-parallel-address", "-dpa", default="127.0.0.1",
                       help="address of data-parallel rank 0 (and of a --headless engine) for frontends and "
                            "other hosts' engines")
    group.add_argument("--data-parallel-rpc-port", "-dpp", type=int, default=29550,
                       help="port of data-parallel rank 0 at --data-parallel-address")
    group.add_argument("--kv-transfer-config", default=None, type=_kv_transfer_config,
                       help='disaggregated prefill/decode, e.g. \'{"kv_connector": "ZmqPullConnector", '
                            '"kv_role": "kv_producer", "kv_port": 14579}\'')


def _kv_transfer_config(text: str) -> KVTransferConfig:
    try:
        return KVTransferConfig.from_json(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
