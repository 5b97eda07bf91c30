"""Per-request state from the scheduler's diffs, flattened inputs, one forward pass, sampling on rank 0.

A step, for request r with `n` scheduled tokens:

    token_ids(r):  | computed (KV in cache) | n scheduled this step | not yet scheduled (later chunks) |
                   0              num_computed_tokens      num_computed + n                  len(token_ids)

The scheduled slice goes into the flattened batch at positions num_computed .. num_computed + n - 1. When the
slice reaches the end of `token_ids` the request samples one token from the logits of its last row; otherwise
(a partial prefill chunk) its sampled list is empty. Sampled tokens are not appended to `token_ids` here: the
core sends them back as the next step's `new_token_ids`. They are appended to the sampling state's
`output_token_ids` at once, which penalties read.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from engine_core.config import CacheConfig, ModelConfig
from engine_core.protocol import (KVConnectorOutput, ModelRunnerOutput, NewRequestData, SchedulerOutput,
                                  TokenLogprobs)
from workers.attention import AttentionMetadata, build_attention_metadata
from workers.kv_cache_alloc import allocate_kv_caches, kv_cache_bytes_per_block
from workers.kv_connector.base import KVConnectorWorker
from workers.loader import load_hf_config
from workers.models import build_model
from workers.prompt_logprobs import PromptLogprobsPlan, compute_prompt_logprobs, wants_prompt_logprobs
from workers.sampler import RequestSamplingState, Sampler, make_sampling_state
from workers.structured_output import StepMasks, StructuredOutputs

logger = logging.getLogger("conveyor.model_runner")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# CPU default KV budget: this fraction of available RAM, but no more than this many max-length sequences need.
_CPU_DEFAULT_RAM_FRACTION = 0.4
_CPU_DEFAULT_MAX_BYTES = 4 * 2**30  # like vLLM's CPU default KV space: leaves room for other processes
_CPU_DEFAULT_MAX_SEQS = 256
# CUDA profiling: the largest prefill and the most sampling rows a step is assumed to hold.
_PROFILE_MAX_TOKENS = 8192
_PROFILE_MAX_SEQS = 256


@dataclass
class _RequestState:
    """What the worker remembers about a request between steps (built from diffs)."""

    token_ids: list[int]  # prompt, then every generated token the core has sent back
    block_ids: list[int]
    num_computed_tokens: int
    sampling: RequestSamplingState


@dataclass
class _StepInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # [num_sampling_reqs] int64 rows of the flattened batch to sample from
    sampling_reqs: list[int]  # index into the step's request list of each sampling row
    prompt_logprobs: PromptLogprobsPlan | None = None  # rows scoring prompt tokens (requests with prompt_logprobs)


class ModelRunner:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, device: torch.device,
                 tp_rank: int = 0, tp_size: int = 1) -> None:
        self.model_config, self.cache_config = model_config, cache_config
        self.device, self.tp_rank, self.tp_size = device, tp_rank, tp_size
        if model_config.dtype not in _DTYPES:
            raise ValueError(f"dtype {model_config.dtype!r} is not one of {sorted(_DTYPES)}")
        self.dtype = _DTYPES[model_config.dtype]
        self.block_size = cache_config.block_size
        self.hf_config = load_hf_config(model_config.model)
        self.model = build_model(self.hf_config, model_config.model, self.dtype, device, tp_rank, tp_size)
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []
        self.requests: dict[str, _RequestState] = {}
        self.kv_connector: KVConnectorWorker | None = None  # disaggregated prefill/decode, set by the worker
        # Grammar matchers for structured outputs: rank 0 samples, so only rank 0 keeps them.
        self.structured_output = (StructuredOutputs(model_config.tokenizer_dir, model_config.eos_token_ids, device)
                                  if tp_rank == 0 else None)

    # ------------------------------------------------------------------ KV cache sizing

    def determine_num_blocks(self) -> int:
        """How many KV blocks this rank can hold (the core takes the minimum over ranks)."""
        if self.cache_config.num_blocks_override:
            return self.cache_config.num_blocks_override
        bytes_per_block = kv_cache_bytes_per_block(self.model, self.block_size, self.dtype)
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
                             dtype=self.dtype, device=self.device) for _ in range(self.model.num_layers)]
        metadata = build_attention_metadata([num_tokens], [num_tokens], [list(range(num_blocks))],
                                            self.block_size, self.device)
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)  # [num_tokens]
        hidden = self.model(input_ids, metadata.positions, empty, metadata)  # [num_tokens, hidden]
        self.model.compute_logits(hidden[-_PROFILE_MAX_SEQS:])

    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate the KV cache (the core sends the block count agreed by all ranks)."""
        self.kv_caches = allocate_kv_caches(self.model, num_blocks, self.block_size, self.dtype, self.device)

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
        masks = None  # structured outputs: this step's token masks, computed on a thread during the forward
        if self.structured_output is not None and inputs.sampling_reqs:
            masks = self.structured_output.start(
                [(request_ids[i], self.requests[request_ids[i]].sampling) for i in inputs.sampling_reqs],
                self.requests.keys())
        hidden = self.model(inputs.input_ids, inputs.metadata.positions, self.kv_caches,
                            inputs.metadata)  # [num_tokens, hidden]
        sampled: list[list[int]] = [[] for _ in request_ids]
        logprobs: list[list[TokenLogprobs] | None] = [None] * len(request_ids)
        prompt_logprobs = None
        if inputs.prompt_logprobs is not None:  # before sampling: only requests with no output yet want them
            prompt_logprobs = compute_prompt_logprobs(self.model.compute_logits, hidden, inputs.prompt_logprobs,
                                                      len(request_ids), self.tp_rank == 0)
        request_errors: dict[str, str] = {}
        if inputs.sampling_reqs:
            logits = self.model.compute_logits(hidden.index_select(0, inputs.sample_rows))  # [S, vocab] float32
            if self.tp_rank == 0:
                self._sample(request_ids, inputs.sampling_reqs, logits, sampled, logprobs, request_errors, masks)
        return ModelRunnerOutput(request_ids=request_ids, sampled_token_ids=sampled, logprobs=logprobs,
                                 kv_connector_output=self._kv_connector_output(), rank=self.tp_rank,
                                 prompt_logprobs=prompt_logprobs, request_errors=request_errors or None)

    def _kv_connector_output(self) -> KVConnectorOutput | None:
        return self.kv_connector.collect() if self.kv_connector is not None else None

    def _update_states(self, scheduler_output: SchedulerOutput) -> None:
        for request_id in scheduler_output.finished_request_ids:
            self.requests.pop(request_id, None)
        for new in scheduler_output.new_requests:
            self.requests[new.request_id] = self._new_state(new)
        for diff in scheduler_output.cached_requests:
            state = self.requests[diff.request_id]
            state.token_ids.extend(diff.new_token_ids)
            state.block_ids.extend(diff.new_block_ids)
            state.num_computed_tokens = diff.num_computed_tokens

    def _new_state(self, new: NewRequestData) -> _RequestState:
        sampling = make_sampling_state(new.sampling_params, list(new.token_ids[:new.num_prompt_tokens]),
                                       list(new.token_ids[new.num_prompt_tokens:]), new.eos_token_id, self.device)
        return _RequestState(token_ids=list(new.token_ids), block_ids=list(new.block_ids),
                             num_computed_tokens=new.num_computed_tokens, sampling=sampling)

    def _prepare_inputs(self, request_ids: list[str], num_scheduled: dict[str, int]) -> _StepInputs:
        token_ids: list[int] = []
        query_lens, seq_lens, block_tables, sampling_reqs, sample_rows = [], [], [], [], []
        prompt_logprobs: PromptLogprobsPlan | None = None
        for i, request_id in enumerate(request_ids):
            state, query_len = self.requests[request_id], num_scheduled[request_id]
            start, end = state.num_computed_tokens, state.num_computed_tokens + query_len
            assert end <= len(state.token_ids), f"{request_id}: scheduled to {end} of {len(state.token_ids)} tokens"
            sampling, num_prompt_tokens = state.sampling, len(state.sampling.prompt_token_ids)
            # Rank-independent test (output_token_ids grows on rank 0 only): every rank must join compute_logits.
            if wants_prompt_logprobs(sampling.params.prompt_logprobs, len(state.token_ids) - num_prompt_tokens,
                                     start, num_prompt_tokens):
                prompt_logprobs = prompt_logprobs or PromptLogprobsPlan()
                prompt_logprobs.add(i, state.token_ids, num_prompt_tokens, start, end,
                                    first_row=len(token_ids), num_top=sampling.params.prompt_logprobs or 0)
            token_ids.extend(state.token_ids[start:end])
            query_lens.append(query_len)
            seq_lens.append(end)
            block_tables.append(state.block_ids)
            if end == len(state.token_ids):
                sampling_reqs.append(i)
                sample_rows.append(len(token_ids) - 1)
        metadata = build_attention_metadata(query_lens, seq_lens, block_tables, self.block_size, self.device)
        return _StepInputs(input_ids=torch.tensor(token_ids, dtype=torch.int64).to(self.device),
                           metadata=metadata,
                           sample_rows=torch.tensor(sample_rows, dtype=torch.int64).to(self.device),
                           sampling_reqs=sampling_reqs, prompt_logprobs=prompt_logprobs)

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
