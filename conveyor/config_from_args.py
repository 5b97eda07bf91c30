"""Parsed flags -> the frozen configs each process takes (`EngineConfig`, `FrontendConfig`); reads the model
folder to fill in what the flags leave to it."""
from __future__ import annotations

import argparse
import os
from typing import Any

from conveyor.serving_mode import ENCODER_DECODER_ARCHITECTURES
from engine_core.config import (CacheConfig, EngineConfig, FrontendConfig, ModelConfig, ParallelConfig,
                                SchedulerConfig, parse_byte_size, parse_json_object)


def frontend_config_from_args(args: argparse.Namespace) -> FrontendConfig:
    from frontend.generate.tool_parsers import tool_parser_names  # pure Python, no torch

    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise SystemExit("--enable-auto-tool-choice needs --tool-call-parser (one of "
                         f"{', '.join(tool_parser_names())})")
    if args.tool_call_parser is not None and args.tool_call_parser not in tool_parser_names():
        raise SystemExit(f"--tool-call-parser {args.tool_call_parser!r} is not one of "
                         f"{', '.join(tool_parser_names())}")
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        raise SystemExit("HTTPS needs both --ssl-keyfile and --ssl-certfile")
    return FrontendConfig(host=args.host, port=args.port,
                          api_key=tuple(args.api_key) if args.api_key else None,
                          api_server_count=args.api_server_count, uvicorn_log_level=args.uvicorn_log_level,
                          metrics_require_api_key=args.metrics_require_api_key,
                          ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
                          ssl_ca_certs=args.ssl_ca_certs, ssl_cert_reqs=args.ssl_cert_reqs,
                          root_path=args.root_path, allowed_origins=tuple(args.allowed_origins),
                          allowed_methods=tuple(args.allowed_methods), allowed_headers=tuple(args.allowed_headers),
                          allow_credentials=args.allow_credentials, enable_log_requests=args.enable_log_requests,
                          max_log_len=args.max_log_len, disable_uvicorn_access_log=args.disable_uvicorn_access_log,
                          enable_request_id_headers=args.enable_request_id_headers,
                          max_request_body_mb=max(0.0, args.max_request_body_mb),
                          enable_force_include_usage=args.enable_force_include_usage,
                          enable_auto_tool_choice=args.enable_auto_tool_choice,
                          tool_call_parser=args.tool_call_parser,
                          exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
                          trust_request_chat_template=args.trust_request_chat_template,
                          allowed_local_media_path=args.allowed_local_media_path,
                          allowed_media_domains=(None if args.allowed_media_domains is None
                                                 else tuple(args.allowed_media_domains)),
                          limit_mm_per_prompt=_media_limits(args.limit_mm_per_prompt),
                          mm_processor_kwargs=_json_flag(args.mm_processor_kwargs, "--mm-processor-kwargs"),
                          media_io_kwargs=_media_io_kwargs(args.media_io_kwargs),
                          enable_mm_embeds=args.enable_mm_embeds,
                          mm_processor_cache_gb=max(0.0, args.mm_processor_cache_gb),
                          shutdown_timeout_s=max(0.0, args.shutdown_timeout))


def _json_flag(text: str, flag: str) -> dict[str, Any]:
    try:
        return parse_json_object(text, flag)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def _media_io_kwargs(text: str) -> dict[str, dict[str, Any]]:
    options = _json_flag(text, "--media-io-kwargs")
    for modality, value in options.items():
        if modality not in ("image", "video") or not isinstance(value, dict):
            raise SystemExit(f"--media-io-kwargs: {modality!r}: expected a modality (image, video) mapped to an "
                             "object of options")
    return options


def _media_limits(text: str) -> dict[str, int]:
    limits = _json_flag(text, "--limit-mm-per-prompt")
    for modality, limit in limits.items():
        if modality not in ("image", "video") or not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise SystemExit(f"--limit-mm-per-prompt: {modality!r}: {limit!r} is not a modality (image, video) with "
                             "a count >= 0")
    return limits


def engine_config_from_args(args: argparse.Namespace, engine_address: str) -> tuple[EngineConfig, FrontendConfig]:
    import importlib.util

    if args.distributed_executor_backend == "ray" and importlib.util.find_spec("ray") is None:
        raise SystemExit("--distributed-executor-backend ray needs Ray: pip install 'ray[serve]==2.60.0' "
                         "(the project's [ray] extra; `make install` includes it)")
    device = args.device
    if device == "auto":
        device = "cuda" if _cuda_visible() else "cpu"
    model, is_encoder = _model_config(args, device)
    is_encoder_decoder = model.architecture in ENCODER_DECODER_ARCHITECTURES
    engine = EngineConfig(
        model=model,
        cache=_cache_config(args, is_encoder, is_encoder_decoder),
        scheduler=_scheduler_config(args, model, is_encoder, is_encoder_decoder),
        parallel=ParallelConfig(tensor_parallel_size=args.tensor_parallel_size, device=device,
                                data_parallel_size=args.data_parallel_size,
                                distributed_executor_backend=args.distributed_executor_backend),
        engine_address=engine_address,
        log_stats=not args.disable_log_stats,
    )
    return engine, frontend_config_from_args(args)


def _model_config(args: argparse.Namespace, device: str) -> tuple[ModelConfig, bool]:
    """The model's config from its folder and the flags, and whether it is an encoder (whole prompt at once)."""
    from conveyor.model_source import resolve_model_config

    runner, convert = _runner_and_convert(args)
    try:
        model, mode = resolve_model_config(
            args.model or args.model_flag, served_model_name=(args.served_model_name or [None])[0],
            tokenizer=args.tokenizer, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
            generation_config=args.generation_config, chat_template=args.chat_template, device=device,
            runner=runner, convert=convert, quantization=args.quantization,
            pooler_overrides=(parse_json_object(args.pooler_config, "--pooler-config")
                              if args.pooler_config else None),
            score_template=args.score_template)
    except ValueError as exc:
        raise SystemExit(f"conveyor serve: {exc}") from None
    return model, mode.is_encoder


def _cache_config(args: argparse.Namespace, is_encoder: bool, is_encoder_decoder: bool) -> CacheConfig:
    # An encoder keeps no KV cache to share; an encoder-decoder's decoder KV depends on the audio, which block
    # hashes do not cover.
    prefix_caching = args.enable_prefix_caching and not is_encoder and not is_encoder_decoder
    return CacheConfig(block_size=args.block_size, cache_dtype=args.kv_cache_dtype, gpu_memory_utilization=args.gpu_memory_utilization,
                       kv_cache_memory_bytes=parse_byte_size(args.kv_cache_memory) if args.kv_cache_memory else None,
                       enable_prefix_caching=prefix_caching,
                       num_blocks_override=args.num_gpu_blocks_override, kv_transfer=args.kv_transfer_config)


def _scheduler_config(args: argparse.Namespace, model: ModelConfig, is_encoder: bool,
                      is_encoder_decoder: bool) -> SchedulerConfig:
    chunked_prefill = args.enable_chunked_prefill
    max_batched = args.max_num_batched_tokens or (2048 if chunked_prefill else model.max_model_len)
    if is_encoder:  # bidirectional attention over the whole prompt at once
        chunked_prefill = False
        max_batched = max(max_batched, model.max_model_len)
    # Encoder-decoder requests hold memory the KV budget does not count: 18-37 MB each for Whisper tiny/base.
    max_num_seqs = args.max_num_seqs or (64 if is_encoder_decoder else 256)
    return SchedulerConfig(max_num_batched_tokens=max_batched, max_num_seqs=max_num_seqs,
                           max_model_len=model.max_model_len, policy=args.scheduling_policy,
                           enable_chunked_prefill=chunked_prefill, max_waiting_requests=max(0, args.max_waiting_requests),
                           pooling_tasks=model.pooler.tasks if model.pooler is not None else ())


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
