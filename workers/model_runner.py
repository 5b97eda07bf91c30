"""Per-request state from the scheduler's diffs, flattened inputs, one forward pass, sampling on rank 0.

A step, for request r with `n` scheduled tokens:

    token_ids(r):  | computed (KV in cache) | n scheduled this step | not yet scheduled (later chunks) |
                   0              num_computed_tokens      num_computed + n                  len(token_ids)

The scheduled slice goes into the flattened batch at positions num_computed .. num_computed + n - 1. When the
slice reaches the end of `token_ids` the request samples one token from the logits of its last row; otherwise
(a partial prefill chunk) its sampled list is empty. Sampled tokens are not appended to `token_ids` here: the
core sends them back as the next step's `new_token_ids`. They are appended to the sampling state's
`output_token_ids` at once, which penalties read.

A pooling request (`NewRequestData.pooling_params`) never samples: its rows are pooled when its prompt completes
(`workers.pooling_requests`). Encoders (`uses_kv_cache` False) keep no KV cache: each prompt runs whole in one step,
and the block count is bookkeeping for the scheduler only.

An encoder-decoder speech model (Whisper, `is_encoder_decoder`) gets its request's audio with `NewRequestData.audio`:
the request's first scheduled step runs the encoder on it and keeps the cross-attention K/V until the request
finishes or is preempted (`workers.encoder_decoder.requests`); the prompt tokens are the decoder's. Its sampling applies
Whisper's suppress lists first, and its timestamp rules to requests whose prompt lacks <|notimestamps|>.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

from engine_core.config import CacheConfig, ModelConfig, PoolerConfig
from engine_core.protocol import (KVConnectorOutput, ModelRunnerOutput, NewRequestData, PoolingOutput,
                                  SchedulerOutput, TokenLogprobs)
from workers.attention import AttentionMetadata, build_attention_metadata
from workers.encoder_decoder.requests import EncoderDecoderRequests
from workers.kernels import cpu as cpu_kernels
from workers.kv_cache_alloc import allocate_kv_caches, kv_cache_bytes_per_block
from workers.kv_connector.base import KVConnectorWorker
from workers.layers.cpu_gemm import native_bf16_cpu
from workers.loading.loader import load_hf_config
from workers.models import PoolingModel, build_model
from workers.multimodal import MultiModalModel, MultiModalRequests, is_multimodal
from workers.pooling_requests import PoolingSlice, PoolingSpan, PoolingState, pool_step, token_type_ids
from workers.sampling.prompt_logprobs import PromptLogprobsPlan, compute_prompt_logprobs, wants_prompt_logprobs
from workers.sampling.sampler import Sampler
from workers.sampling.state import RequestSamplingState, make_sampling_state
from workers.sampling.structured_output import StepMasks, StructuredOutputs

if TYPE_CHECKING:
    from workers.models.whisper import WhisperForConditionalGeneration

logger = logging.getLogger("conveyor.model_runner")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# CPU default KV budget: this fraction of available RAM, but no more than this many max-length sequences need.
_CPU_DEFAULT_RAM_FRACTION = 0.4
_CPU_DEFAULT_MAX_BYTES = 4 * 2**30  # like vLLM's CPU default KV space: leaves room for other processes
_CPU_DEFAULT_MAX_SEQS = 256
# CUDA profiling: the largest prefill and the most sampling rows a step is assumed to hold.
_PROFILE_MAX_TOKENS = 8192
_PROFILE_MAX_SEQS = 256
# A request that does not fit the runner, by ModelRunner.is_pooling.
_WRONG_RUNNER = {True: "this model serves pooling requests only (it does not generate text)",
                 False: "this model generates text; pooling requests need a model served with --runner pooling"}


@dataclass
class _RequestState:
    """What the worker remembers about a request between steps (built from diffs)."""

    token_ids: list[int]  # prompt, then every generated token the core has sent back
    block_ids: list[int]
    num_computed_tokens: int
    sampling: RequestSamplingState
    pooling: PoolingState | None = None  # set for a pooling request


@dataclass
class _StepInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # [num_sampling_reqs] int64 rows of the flattened batch to sample from
    sampling_reqs: list[int]  # index into the step's request list of each sampling row
    prompt_logprobs: PromptLogprobsPlan | None = None  # rows scoring prompt tokens (requests with prompt_logprobs)
    pooling_spans: list[PoolingSpan] = field(default_factory=list)
    token_type_ids: torch.Tensor | None = None  # [num_tokens] int64, encoders only, when a request carries them
    request_errors: dict[str, str] = field(default_factory=dict)  # requests refused before the forward


class ModelRunner:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, device: torch.device,
                 tp_rank: int = 0, tp_size: int = 1) -> None:
        self.model_config, self.cache_config = model_config, cache_config
        self.device, self.tp_rank, self.tp_size = device, tp_rank, tp_size
        if model_config.dtype not in _DTYPES:
            raise ValueError(f"dtype {model_config.dtype!r} is not one of {sorted(_DTYPES)}")
        self.dtype = _DTYPES[model_config.dtype]
        if cache_config.cache_dtype != "auto" and cache_config.cache_dtype not in _DTYPES:
            raise ValueError(f"kv cache dtype {cache_config.cache_dtype!r} is not auto or one of {sorted(_DTYPES)}")
        self.kv_cache_dtype = self.dtype if cache_config.cache_dtype == "auto" else _DTYPES[cache_config.cache_dtype]
        self.block_size = cache_config.block_size
        self.hf_config = load_hf_config(model_config.model)
        if device.type == "cpu" and self.dtype == torch.float32:
            cpu_kernels.library()  # build (once per machine) or load the fused kernels now, not in the first step
        if device.type == "cpu" and self.dtype != torch.float32 and not native_bf16_cpu() and tp_rank == 0:
            logger.warning("--dtype %s on a CPU without AVX512-BF16 or AMX: it works, but runs slower than float32 "
                           "here (serve with --dtype float32 on this machine)", model_config.dtype)
        self.model = build_model(self.hf_config, model_config.model, self.dtype, device, tp_rank, tp_size,
                                 model_config.runner, model_config.convert, model_config.quantization)
        self.is_pooling = model_config.runner == "pooling"
        self.pooler_config = model_config.pooler or PoolerConfig()
        self.uses_kv_cache = bool(getattr(self.model, "uses_kv_cache", True))
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []
        self.requests: dict[str, _RequestState] = {}
        self.encoder_decoder = (EncoderDecoderRequests(cast("WhisperForConditionalGeneration", self.model),
                                                       self.hf_config, device, model_config.model)
                                if getattr(self.model, "is_encoder_decoder", False) else None)
        self.multimodal = (MultiModalRequests(cast(MultiModalModel, self.model), device)
                           if is_multimodal(self.model) else None)
        self.kv_connector: KVConnectorWorker | None = None  # disaggregated prefill/decode, set by the worker
        # Grammar matchers for structured outputs: rank 0 samples, so only rank 0 keeps them. A pooling model's
        # tokenizer (e.g. BERT's) is no generation vocabulary, and it never samples.
        self.structured_output = (StructuredOutputs(model_config.tokenizer_dir, model_config.eos_token_ids, device)
                                  if tp_rank == 0 and not self.is_pooling else None)

    # ------------------------------------------------------------------ KV cache sizing

    def determine_num_blocks(self) -> int:
        """How many KV blocks this rank can hold (the core takes the minimum over ranks)."""
        if self.cache_config.num_blocks_override:
            return self.cache_config.num_blocks_override
        if not self.uses_kv_cache:  # an encoder: blocks are the scheduler's bookkeeping, backed by no memory
            return _CPU_DEFAULT_MAX_SEQS * -(-self.model_config.max_model_len // self.block_size)
        bytes_per_block = kv_cache_bytes_per_block(self.model, self.block_size, self.kv_cache_dtype)
        if self.device.type == "cuda":
            budget = self._cuda_kv_budget()
        elif self.cache_config.kv_cache_memory_bytes:
            budget = self.cache_config.kv_cache_memory_bytes
        else:
            max_useful = _CPU_DEFAULT_MAX_SEQS * self.model_config.max_model_len // self.block_size * bytes_per_block
            budget = min(int(_available_ram_bytes() * _CPU_DEFAULT_RAM_FRACTION), _CPU_DEFAULT_MAX_BYTES, max_useful)
        num_blocks = budget // bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"no room for the KV cache: budget {budget} bytes, one block takes {bytes_per_block}")
        if num_blocks * self.block_size < self.model_config.max_model_len:
            logger.warning("KV cache holds %d tokens, less than max_model_len=%d",
                           num_blocks * self.block_size, self.model_config.max_model_len)
        return int(num_blocks)

    def _cuda_kv_budget(self) -> int:
        """gpu_memory_utilization * total, minus the peak of weights + activations seen in a profiling forward
        and memory held outside torch's allocator (CUDA context, other processes)."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._profile_run()
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        outside_torch = total - free - torch.cuda.memory_reserved(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.empty_cache()
        return int(total * self.cache_config.gpu_memory_utilization) - peak - outside_torch

    @torch.inference_mode()
    def _profile_run(self) -> None:
        """One prefill of the largest expected size against empty caches (attention skips the cache writes)."""
        num_tokens = min(self.model_config.max_model_len, _PROFILE_MAX_TOKENS)
        num_blocks = -(-num_tokens // self.block_size)
        empty = [torch.empty((2, 0, self.block_size, self.model.num_kv_heads, self.model.head_dim),
                             dtype=self.kv_cache_dtype, device=self.device) for _ in range(self.model.num_layers)]
        metadata = build_attention_metadata([num_tokens], [num_tokens], [list(range(num_blocks))],
                                            self.block_size, self.device)
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)  # [num_tokens]
        if self.encoder_decoder is not None:
            self.encoder_decoder.profile()  # the encoder's activations for a full batch of new requests
        hidden = self.model(input_ids, metadata.positions, empty, metadata)  # [num_tokens, hidden]
        if not self.is_pooling:
            self.model.compute_logits(hidden[-_PROFILE_MAX_SEQS:])

    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate the KV cache (the core sends the block count agreed by all ranks); empty for an encoder."""
        if not self.uses_kv_cache:
            self.kv_caches = [torch.empty(0, dtype=self.kv_cache_dtype, device=self.device)
                              for _ in range(self.model.num_layers)]
            return
        self.kv_caches = allocate_kv_caches(self.model, num_blocks, self.block_size, self.kv_cache_dtype, self.device)

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Apply the step's diffs to the request states, run the forward pass, sample (rank 0)."""
        assert self.kv_caches, "initialize_cache must run before the first step"
        self._update_states(scheduler_output)
        if self.kv_connector is not None:
            self.kv_connector.apply(scheduler_output.kv_connector_metadata)
        request_ids = list(scheduler_output.num_scheduled_tokens)
        if not request_ids:
            return ModelRunnerOutput(request_ids=[], sampled_token_ids=[], logprobs=[],
                                     kv_connector_output=self._kv_connector_output(), rank=self.tp_rank)
        inputs = self._prepare_inputs(request_ids, scheduler_output.num_scheduled_tokens)
        cross_slots = self._prepare_cross_attention(request_ids, inputs)
        inputs_embeds, positions = self._merge_images(request_ids, inputs)
        masks = None  # structured outputs: this step's token masks, computed on a thread during the forward
        if self.structured_output is not None and inputs.sampling_reqs:
            masks = self.structured_output.start(
                [(request_ids[i], self.requests[request_ids[i]].sampling) for i in inputs.sampling_reqs],
                self.requests.keys())
        hidden = self._forward(inputs, positions, cross_slots, inputs_embeds)  # [num_tokens, hidden]
        sampled: list[list[int]] = [[] for _ in request_ids]
        logprobs: list[list[TokenLogprobs] | None] = [None] * len(request_ids)
        prompt_logprobs = None
        if inputs.prompt_logprobs is not None:  # before sampling: only requests with no output yet want them
            prompt_logprobs = compute_prompt_logprobs(self.model.compute_logits, hidden, inputs.prompt_logprobs,
                                                      len(request_ids), self.tp_rank == 0)
        request_errors = inputs.request_errors
        pooling_outputs = self._pool(request_ids, scheduler_output.num_scheduled_tokens, inputs.pooling_spans, hidden,
                                     request_errors)
        if inputs.sampling_reqs:
            logits = self.model.compute_logits(hidden.index_select(0, inputs.sample_rows))  # [S, vocab] float32
            if self.tp_rank == 0:
                if self.encoder_decoder is not None:  # Whisper's suppress lists and timestamp rules
                    self.encoder_decoder.suppress(logits, [self.requests[request_ids[i]].sampling
                                                           for i in inputs.sampling_reqs])
                self._sample(request_ids, inputs.sampling_reqs, logits, sampled, logprobs, request_errors, masks)
        return ModelRunnerOutput(request_ids=request_ids, sampled_token_ids=sampled, logprobs=logprobs,
                                 kv_connector_output=self._kv_connector_output(), rank=self.tp_rank,
                                 prompt_logprobs=prompt_logprobs, request_errors=request_errors or None,
                                 pooling_outputs=pooling_outputs,
                                 num_encoded_items=self.multimodal.num_encoded_items if inputs_embeds is not None
                                 and self.multimodal is not None and self.tp_rank == 0 else 0)

    def _forward(self, inputs: _StepInputs, positions: torch.Tensor, cross_slots: list[int] | None = None,
                 inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if inputs_embeds is not None or positions is not inputs.metadata.positions:
            return cast(MultiModalModel, self.model)(inputs.input_ids, positions, self.kv_caches,
                                                     inputs.metadata, inputs_embeds=inputs_embeds)
        if cross_slots is not None:
            return cast("WhisperForConditionalGeneration", self.model)(
                inputs.input_ids, inputs.metadata.positions, self.kv_caches, inputs.metadata, cross_slots=cross_slots)
        if self.uses_kv_cache:
            return self.model(inputs.input_ids, inputs.metadata.positions, self.kv_caches, inputs.metadata)
        return cast(PoolingModel, self.model)(inputs.input_ids, inputs.metadata.positions, self.kv_caches,
                                              inputs.metadata, token_type_ids=inputs.token_type_ids)

    def _prepare_cross_attention(self, request_ids: list[str], inputs: _StepInputs) -> list[int] | None:
        """Encoder-decoder models: encode the audio of the step's new requests; each request's cross-attention slot.
        A request that fails here (no audio, bad audio) leaves the step's sampling rows; its error is reported."""
        if self.encoder_decoder is None:
            return None
        slots = self.encoder_decoder.prepare(request_ids, inputs.request_errors)
        self._drop_failed_sampling_rows(request_ids, inputs)
        return slots

    def _merge_images(self, request_ids: list[str], inputs: _StepInputs) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Multimodal models: the step's input embeddings with the images its chunks reach merged in (None when
        no chunk reaches an image) and its rotary positions (M-RoPE: shifted, or [3, T]). A request whose image
        fails leaves the step's sampling rows."""
        if self.multimodal is None:
            return None, inputs.metadata.positions
        rows = inputs.metadata.query_start_loc
        chunks = [(request_id, self.requests[request_id].num_computed_tokens,
                   self.requests[request_id].num_computed_tokens + rows[i + 1] - rows[i], rows[i])
                  for i, request_id in enumerate(request_ids)]
        positions = self.multimodal.positions(inputs.metadata.positions, chunks)
        embeds = self.multimodal.inputs_embeds(inputs.input_ids, chunks, inputs.request_errors)
        self._drop_failed_sampling_rows(request_ids, inputs)
        return embeds, positions

    def _drop_failed_sampling_rows(self, request_ids: list[str], inputs: _StepInputs) -> None:
        keep = [row for row, i in enumerate(inputs.sampling_reqs) if request_ids[i] not in inputs.request_errors]
        if len(keep) < len(inputs.sampling_reqs):
            inputs.sampling_reqs = [inputs.sampling_reqs[row] for row in keep]
            inputs.sample_rows = inputs.sample_rows[torch.tensor(keep, dtype=torch.int64).to(self.device)]

    def _kv_connector_output(self) -> KVConnectorOutput | None:
        return self.kv_connector.collect() if self.kv_connector is not None else None

    def _update_states(self, scheduler_output: SchedulerOutput) -> None:
        if self.multimodal is not None:
            self.multimodal.free(scheduler_output.free_encoder_hashes)
        for request_id in scheduler_output.finished_request_ids:
            self.requests.pop(request_id, None)
            if self.encoder_decoder is not None:
                self.encoder_decoder.finish(request_id)
            if self.multimodal is not None:
                self.multimodal.finish(request_id)
        for new in scheduler_output.new_requests:
            self.requests[new.request_id] = self._new_state(new)
            if self.encoder_decoder is not None:
                self.encoder_decoder.start(new.request_id, new.audio)
            if self.multimodal is not None:
                self.multimodal.finish(new.request_id)  # a preempted request restarts from scratch
                self.multimodal.start(new.request_id, new.mm_items)
        for diff in scheduler_output.cached_requests:
            state = self.requests[diff.request_id]
            state.token_ids.extend(diff.new_token_ids)
            state.block_ids.extend(diff.new_block_ids)
            state.num_computed_tokens = diff.num_computed_tokens

    def _new_state(self, new: NewRequestData) -> _RequestState:
        sampling = make_sampling_state(new.sampling_params, list(new.token_ids[:new.num_prompt_tokens]),
                                       list(new.token_ids[new.num_prompt_tokens:]), new.eos_token_id, self.device)
        pooling = None if new.pooling_params is None else PoolingState(new.pooling_params)
        return _RequestState(token_ids=list(new.token_ids), block_ids=list(new.block_ids),
                             num_computed_tokens=new.num_computed_tokens, sampling=sampling, pooling=pooling)

    def _prepare_inputs(self, request_ids: list[str], num_scheduled: dict[str, int]) -> _StepInputs:
        token_ids: list[int] = []
        query_lens, seq_lens, block_tables, sampling_reqs, sample_rows = [], [], [], [], []
        prompt_logprobs: PromptLogprobsPlan | None = None
        pooling_spans: list[PoolingSpan] = []
        request_errors: dict[str, str] = {}
        for i, request_id in enumerate(request_ids):
            state, query_len = self.requests[request_id], num_scheduled[request_id]
            start, end = state.num_computed_tokens, state.num_computed_tokens + query_len
            self._check_slice(request_id, state, start, end)
            sampling, num_prompt_tokens = state.sampling, len(state.sampling.prompt_token_ids)
            is_pooling_request, completes = state.pooling is not None, end == len(state.token_ids)
            if is_pooling_request and self.is_pooling:
                pooling_spans.append(PoolingSpan(i, len(token_ids), len(token_ids) + query_len, completes))
            # Rank-independent test (output_token_ids grows on rank 0 only): every rank must join compute_logits.
            elif not is_pooling_request and wants_prompt_logprobs(
                    sampling.params.prompt_logprobs, len(state.token_ids) - num_prompt_tokens, start,
                    num_prompt_tokens):
                prompt_logprobs = prompt_logprobs or PromptLogprobsPlan()
                prompt_logprobs.add(i, state.token_ids, num_prompt_tokens, start, end,
                                    first_row=len(token_ids), num_top=sampling.params.prompt_logprobs or 0)
            token_ids.extend(state.token_ids[start:end])
            query_lens.append(query_len)
            seq_lens.append(end)
            block_tables.append(state.block_ids)
            if completes and is_pooling_request != self.is_pooling:
                request_errors[request_id] = _WRONG_RUNNER[self.is_pooling]
            elif completes and not is_pooling_request:
                sampling_reqs.append(i)
                sample_rows.append(len(token_ids) - 1)
        metadata = build_attention_metadata(query_lens, seq_lens, block_tables, self.block_size, self.device)
        type_ids = None
        if not self.uses_kv_cache and pooling_spans:
            type_ids = token_type_ids(self._pooling_slices(request_ids, num_scheduled),
                                      int(getattr(self.hf_config, "type_vocab_size", 1) or 1), request_errors)
        return _StepInputs(input_ids=torch.tensor(token_ids, dtype=torch.int64).to(self.device),
                           metadata=metadata,
                           sample_rows=torch.tensor(sample_rows, dtype=torch.int64).to(self.device),
                           sampling_reqs=sampling_reqs, prompt_logprobs=prompt_logprobs,
                           pooling_spans=pooling_spans, token_type_ids=None if type_ids is None else type_ids.to(self.device), request_errors=request_errors)

    def _check_slice(self, request_id: str, state: _RequestState, start: int, end: int) -> None:
        assert end <= len(state.token_ids), f"{request_id}: scheduled to {end} of {len(state.token_ids)} tokens"
        if not self.uses_kv_cache and (start != 0 or end != len(state.token_ids)):
            raise ValueError(f"{request_id}: an encoder runs each prompt whole in one step, got tokens {start}..{end} "
                             f"of {len(state.token_ids)} (chunked prefill must be off for encoder models)")

    def _pooling_slices(self, request_ids: list[str], num_scheduled: dict[str, int]) -> list[PoolingSlice]:
        return [PoolingSlice(request_id, self.requests[request_id].token_ids,
                             self.requests[request_id].num_computed_tokens, num_scheduled[request_id],
                             self.requests[request_id].pooling) for request_id in request_ids]

    def _pool(self, request_ids: list[str], num_scheduled: dict[str, int], spans: list[PoolingSpan],
              hidden: torch.Tensor, request_errors: dict[str, str]) -> list[PoolingOutput | None] | None:
        """Rank 0 pools; other ranks answer None."""
        if not spans or self.tp_rank != 0:
            return None
        head = cast(PoolingModel, self.model).classify if getattr(self.model, "num_labels", 0) else None
        return pool_step(self._pooling_slices(request_ids, num_scheduled), spans, hidden, self.pooler_config, head,
                         request_errors)

    def _sample(self, request_ids: list[str], sampling_reqs: list[int], logits: torch.Tensor,
                sampled: list[list[int]], logprobs: list[list[TokenLogprobs] | None],
                request_errors: dict[str, str], masks: Future[StepMasks] | None = None) -> None:
        """Fill `sampled`/`logprobs` for the sampling requests and record each token in its sampling state; a
        request whose logits processors or grammar failed gets no token and its error in `request_errors`."""
        states = [self.requests[request_ids[i]].sampling for i in sampling_reqs]
        grammar_errors: dict[int, str] = {}
        if masks is not None and self.structured_output is not None:  # disallowed tokens -> -inf, in place
            grammar_errors = self.structured_output.apply(masks, logits)
        output = self.sampler.sample(logits, states)
        for row, (i, state, token_id, token_logprobs) in enumerate(
                zip(sampling_reqs, states, output.token_ids, output.logprobs)):
            if row in output.errors:
                request_errors[request_ids[i]] = output.errors[row]
                continue
            grammar_error = grammar_errors.get(row)
            if masks is not None and self.structured_output is not None and grammar_error is None:
                grammar_error = self.structured_output.advance(request_ids[i], token_id)
            if grammar_error is not None:
                request_errors[request_ids[i]] = grammar_error
                continue
            state.output_token_ids.append(token_id)
            sampled[i] = [token_id]
            logprobs[i] = token_logprobs


def _available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else total physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
