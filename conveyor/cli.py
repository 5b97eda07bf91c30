"""`conveyor serve [MODEL] [flags]`: flag names follow `vllm serve`, so a vLLM command line works unchanged."""
from __future__ import annotations

import argparse
import os
import sys

from engine_core.config import (CacheConfig, EngineConfig, FrontendConfig, KVTransferConfig, ParallelConfig,
                                SchedulerConfig, parse_byte_size, parse_json_object)


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
    group = parser.add_argument_group("frontend")
    group.add_argument("--host", default="127.0.0.1")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1/* (also VLLM_API_KEY)")
    group.add_argument("--api-server-count", type=int, default=1, help="frontend processes sharing the port")
    group.add_argument("--uvicorn-log-level", default="warning")
    group.add_argument("--max-log-len", type=int, default=None, help="accepted for vLLM compatibility")
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


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--tokenizer", default=None)
    group.add_argument("--served-model-name", nargs="+", default=None)
    group.add_argument("--chat-template", default=None, help="a Jinja2 template file or the template itself")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "float", "bfloat16", "bf16",
                                                           "float16", "half", "fp16"])
    group.add_argument("--max-model-len", type=int, default=None)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--generation-config", default="auto",
                       help="'auto' (model folder), 'vllm' (engine defaults) or a folder")
    group.add_argument("--trust-remote-code", action="store_true", help="accepted for vLLM compatibility")
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


def frontend_config_from_args(args: argparse.Namespace) -> FrontendConfig:
    from frontend.tool_parsers import tool_parser_names  # pure Python, no torch

    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise SystemExit("--enable-auto-tool-choice needs --tool-call-parser (one of "
                         f"{', '.join(tool_parser_names())})")
    if args.tool_call_parser is not None and args.tool_call_parser not in tool_parser_names():
        raise SystemExit(f"--tool-call-parser {args.tool_call_parser!r} is not one of "
                         f"{', '.join(tool_parser_names())}")
    return FrontendConfig(host=args.host, port=args.port, api_key=args.api_key,
                          api_server_count=args.api_server_count, uvicorn_log_level=args.uvicorn_log_level,
                          enable_auto_tool_choice=args.enable_auto_tool_choice,
                          tool_call_parser=args.tool_call_parser,
                          exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
                          trust_request_chat_template=args.trust_request_chat_template)


def engine_config_from_args(args: argparse.Namespace, engine_address: str) -> tuple[EngineConfig, FrontendConfig]:
    import importlib.util

    from conveyor.model_source import resolve_model_config
    from conveyor.serving_mode import ENCODER_DECODER_ARCHITECTURES

    if args.distributed_executor_backend == "ray" and importlib.util.find_spec("ray") is None:
        raise SystemExit("--distributed-executor-backend ray needs Ray: pip install 'ray[serve]==2.60.0' "
                         "(the project's [ray] extra; `make install` includes it)")
    device = args.device
    if device == "auto":
        device = "cuda" if _cuda_visible() else "cpu"
    runner, convert = _runner_and_convert(args)
    try:
        model, mode = resolve_model_config(
            args.model or args.model_flag, served_model_name=(args.served_model_name or [None])[0],
            tokenizer=args.tokenizer, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
            generation_config=args.generation_config, chat_template=args.chat_template, device=device,
            runner=runner, convert=convert,
            pooler_overrides=(parse_json_object(args.pooler_config, "--pooler-config")
                              if args.pooler_config else None),
            score_template=args.score_template)
    except ValueError as exc:
        raise SystemExit(f"conveyor serve: {exc}") from None
    chunked_prefill, prefix_caching = args.enable_chunked_prefill, args.enable_prefix_caching
    max_batched = args.max_num_batched_tokens or (2048 if chunked_prefill else model.max_model_len)
    if mode.is_encoder:  # bidirectional attention over the whole prompt at once; no KV cache to share
        chunked_prefill, prefix_caching = False, False
        max_batched = max(max_batched, model.max_model_len)
    max_num_seqs = args.max_num_seqs or 256
    if model.architecture in ENCODER_DECODER_ARCHITECTURES:
        prefix_caching = False  # the decoder's KV depends on the audio, which block hashes do not cover
        max_num_seqs = args.max_num_seqs or 64  # memory the KV budget does not count: 18-37 MB each for tiny/base
    engine = EngineConfig(
        model=model,
        cache=CacheConfig(block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
                          kv_cache_memory_bytes=parse_byte_size(args.kv_cache_memory) if args.kv_cache_memory else None,
                          enable_prefix_caching=prefix_caching,
                          num_blocks_override=args.num_gpu_blocks_override, kv_transfer=args.kv_transfer_config),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_batched, max_num_seqs=max_num_seqs,
                                  max_model_len=model.max_model_len, policy=args.scheduling_policy,
                                  enable_chunked_prefill=chunked_prefill,
                                  pooling_tasks=model.pooler.tasks if model.pooler is not None else ()),
        parallel=ParallelConfig(tensor_parallel_size=args.tensor_parallel_size, device=device,
                                data_parallel_size=args.data_parallel_size,
                                distributed_executor_backend=args.distributed_executor_backend),
        engine_address=engine_address,
    )
    return engine, frontend_config_from_args(args)


def _runner_and_convert(args: argparse.Namespace) -> tuple[str, str]:
    """--runner/--convert, or what the older --task spelling means."""
    task = {"embedding": "embed", "score": "classify"}.get(args.task, args.task)
    if task == "generate":
        return "generate", args.convert
    if task in ("embed", "classify"):
        return "pooling", task if args.convert == "auto" else args.convert
    return args.runner, args.convert


def _cuda_visible() -> bool:
    """Cheap check that avoids importing torch in the launcher when there is plainly no GPU."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    if not os.path.exists("/dev/nvidia0") and not os.path.exists("/dev/nvidiactl"):
        return False
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from conveyor import launcher

    sys.exit(launcher.serve(args) if args.command == "serve" else launcher.run_frontends(args))
