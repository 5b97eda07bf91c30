"""Wire types: every message that crosses a process boundary is one of these msgspec Structs.

Two boundaries share this module:
- frontend <-> engine core: `EngineCoreRequest`, `AbortRequest`, `ClientHello` in; `EngineCoreOutputs` out.
- engine core <-> workers: `SchedulerOutput`, `InitializeCache`, `Shutdown` in; `WorkerReady`,
  `ModelRunnerOutput` out.

Plain ints, floats, strings and lists only: no pickled tensors. Mutable in-process state (`Request`, KV blocks)
never leaves the engine core; it is converted to these structs in one place (the scheduler).
"""
from __future__ import annotations

from typing import Any, Union

import msgspec

_WIRE = dict(array_like=True, omit_defaults=True, gc=False, frozen=True)


# --------------------------------------------------------------------------- sampling


class StructuredOutputSpec(msgspec.Struct, **_WIRE):
    """A constraint the sampler enforces with token masks. `kind`: "json" (a JSON schema, as JSON text),
    "json_object" (any JSON object; `spec` empty), "regex", "choice" (`spec`: a JSON list of strings), "grammar"
    (Lark/EBNF text) or "structural_tag" (vLLM's structural tag object, as JSON text)."""

    kind: str
    spec: str = ""


class RepetitionDetection(msgspec.Struct, **_WIRE):
    """Stop when the output ends in a pattern of `min_pattern_len`..`max_pattern_len` tokens repeated at least
    `min_repeats` times in a row."""

    min_pattern_len: int = 1
    max_pattern_len: int = 20
    min_repeats: int = 10


class SamplingParams(msgspec.Struct, **_WIRE):
    """Per-request sampling controls, already validated and defaulted by the frontend.

    `top_k` <= 0 and `top_p` == 1.0 mean disabled; `temperature` == 0.0 means greedy.
    `logprobs` is None for none, otherwise the number of top alternatives (0 = only the chosen token).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: Union[int, None] = None
    min_tokens: int = 0
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: Union[int, None] = None
    logit_bias: Union[dict[int, float], None] = None
    prompt_logprobs: Union[int, None] = None  # None: none; k: the prompt tokens' logprobs with k alternatives
    allowed_token_ids: Union[list[int], None] = None  # sample only among these
    bad_words_token_ids: list[list[int]] = []  # token sequences that must never be completed
    structured_output: Union[StructuredOutputSpec, None] = None
    repetition_detection: Union[RepetitionDetection, None] = None
    logits_processors: list[str] = []  # names registered with workers.sampling.logits_processors (vllm_xargs selects)
    logits_processor_args: Union[dict[str, Any], None] = None  # vllm_xargs, passed to those processors


# --------------------------------------------------------------------------- pooling


POOLING_TASKS = ("embed", "classify", "score", "token_embed", "token_classify")


class PoolingParams(msgspec.Struct, **_WIRE):
    """A pooling request: run the prompt once, return pooled hidden states instead of generating.

    `task`: "embed" (one vector), "classify" (class scores of the sequence), "score" (a cross-encoder's relevance,
    the classify head with one label), "token_embed" / "token_classify" (one row per prompt token). None fields
    take the model's default (`PoolerConfig`): `normalize` for embeddings, `use_activation` (softmax/sigmoid) for
    class scores. `dimensions` keeps the first N embedding values (matryoshka), before normalizing.
    `token_type_ids`: BERT segment ids, one per prompt token (a cross-encoder's query/document pair).
    """

    task: str = "embed"
    normalize: Union[bool, None] = None
    use_activation: Union[bool, None] = None
    dimensions: Union[int, None] = None
    token_type_ids: Union[list[int], None] = None


class PoolingOutput(msgspec.Struct, **_WIRE):
    """A pooled result as raw little-endian float32 bytes (a list of floats would cost 9 bytes per value on the
    wire): `shape` is [n] for a sequence result, [num_tokens, n] for a per-token one."""

    shape: list[int]
    data: bytes

    def to_list(self) -> list[float] | list[list[float]]:
        import array
        import sys

        values = array.array("f")
        values.frombytes(self.data)
        if sys.byteorder == "big":
            values.byteswap()
        flat = values.tolist()
        if len(self.shape) == 1:
            return flat
        width = self.shape[-1]
        return [flat[i:i + width] for i in range(0, len(flat), width)]


# --------------------------------------------------------------------------- speech (encoder-decoder)


AUDIO_SAMPLE_RATE = 16000
AUDIO_WINDOW_SAMPLES = 30 * AUDIO_SAMPLE_RATE  # Whisper's encoder sees 30 s at a time


class AudioInput(msgspec.Struct, **_WIRE):
    """One window of speech for an encoder-decoder model (Whisper): 16 kHz mono PCM as little-endian float32 in
    [-1, 1], at most `AUDIO_WINDOW_SAMPLES` samples. The worker turns it into log-mel features and runs the
    encoder once, at the request's first step; the request's prompt tokens are the decoder's prompt."""

    samples: bytes


class MultiModalItem(msgspec.Struct, **_WIRE):
    """One image of a prompt as the frontend's processor left it: pixel values as raw little-endian bytes with
    their shape and dtype, and the run of placeholder tokens in the prompt its embeddings replace.

        prompt_token_ids:  ... USER: <image> <image> ... <image> What is this? ...
                                 ^offset      length tokens      ^offset + length

    `content_hash` (media bytes + processor settings) joins the prefix-cache hash of every block that overlaps
    the placeholders. Qwen2-VL items are patch rows [t*h*w, values] with their `grid_thw` (patches along time,
    height, width), which sizes the encoder's attention and the item's M-RoPE positions."""

    modality: str  # "image" or "video"
    pixel_values: bytes
    shape: list[int]
    dtype: str  # numpy dtype name: "float32"
    offset: int
    length: int
    content_hash: str
    grid_thw: list[int] | None = None


class TokenLogprobs(msgspec.Struct, **_WIRE):
    """Log-probabilities for one generated position (raw model distribution, before sampling transforms)."""

    logprob: float  # of the chosen token
    rank: int  # 1-based rank of the chosen token in the distribution
    top_token_ids: list[int] = []
    top_logprobs: list[float] = []


# --------------------------------------------------------------------------- frontend -> core


class EngineCoreRequest(msgspec.Struct, tag="req", **_WIRE):
    """`sampling_params` is ignored (send the default) when `pooling_params` is set: a pooling request computes
    its prompt once and finishes with `EngineCoreOutput.pooling_output`, generating no token."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: Union[int, None]
    arrival_time: float
    priority: int = 0
    cache_salt: Union[str, None] = None
    client_index: int = 0
    # Disaggregated prefill/decode: {"do_remote_decode": true} on a prefill instance; the prefill's returned
    # params (do_remote_prefill, remote_*) on a decode instance. Opaque to the frontend.
    kv_transfer_params: Union[dict[str, Any], None] = None
    pooling_params: Union[PoolingParams, None] = None
    audio: Union[AudioInput, None] = None  # encoder-decoder speech models: the audio the decoder attends to
    mm_items: list[MultiModalItem] = []  # images, in prompt order (placeholder ranges never overlap)


class AbortRequest(msgspec.Struct, tag="abort", **_WIRE):
    request_ids: list[str]


class ClientHello(msgspec.Struct, tag="hello", **_WIRE):
    """First message of a frontend: registers its ZeroMQ identity so heartbeats and stats reach it.

    With `want_engine_info` the core answers with `EngineCoreOutputs.engine_info` (model, tokenizer files and
    the addresses of every data-parallel engine), which is all a frontend on another host needs to start.
    """

    client_index: int
    want_engine_info: bool = False


class EngineRegistration(msgspec.Struct, tag="register", **_WIRE):
    """A data-parallel engine core (rank > 0, local or on another host) tells rank 0 where frontends find it."""

    dp_rank: int
    address: str


FrontendMessage = Union[EngineCoreRequest, AbortRequest, ClientHello, EngineRegistration]


# --------------------------------------------------------------------------- core -> frontend


class EngineCoreOutput(msgspec.Struct, **_WIRE):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: Union[list[TokenLogprobs], None] = None
    finish_reason: Union[str, None] = None  # "stop" | "length" | "abort" | "error"
    stop_reason: Union[int, str, None] = None  # the stop token id that ended it, or an error message
    num_cached_tokens: int = 0
    kv_transfer_params: Union[dict[str, Any], None] = None  # set on the last output of a prefill for remote decode
    # On the first output only, with SamplingParams.prompt_logprobs: one entry per prompt token (None for the first).
    prompt_logprobs: Union[list[Union[TokenLogprobs, None]], None] = None
    pooling_output: Union[PoolingOutput, None] = None  # a pooling request's result (its only, finished output)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedulerStats(msgspec.Struct, **_WIRE):
    """Engine-wide gauges and cumulative counters, attached to outputs and heartbeats."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use by live requests
    num_kv_blocks: int = 0
    prefix_cache_queries: int = 0  # cumulative prompt tokens looked up
    prefix_cache_hits: int = 0  # cumulative prompt tokens found cached
    num_steps: int = 0  # cumulative engine steps that ran a forward pass
    num_scheduled_reqs: int = 0  # cumulative sum over steps of requests in the step
    max_reqs_in_step: int = 0
    num_preemptions: int = 0
    # Where prompt KV came from (cumulative tokens): computed here, prefix cache hits, or loaded by a KV connector.
    prompt_tokens_computed: int = 0
    prompt_tokens_transferred: int = 0
    num_kv_transfers_failed: int = 0
    num_blocks_held_for_transfer: int = 0  # gauge: blocks a producer keeps until consumers pull them
    mm_items_encoded: int = 0  # cumulative media items the workers' encoder ran on
    mm_encoder_cache_hits: int = 0  # cumulative item needs met by embeddings already held (encoder cache)


class PoolerInfo(msgspec.Struct, **_WIRE):
    """`engine_core.config.PoolerConfig` on the wire (see there)."""

    pooling_type: str
    normalize: bool
    embedding_size: int
    num_labels: int = 0
    id2label: dict[int, str] = {}
    classifier_activation: str = "softmax"
    is_matryoshka: bool = False
    matryoshka_dimensions: list[int] = []


class ModelInfo(msgspec.Struct, **_WIRE):
    """What a frontend needs of the model; files travel as bytes so a frontend on another host needs no copy."""

    model: str
    served_model_name: str
    architecture: str
    dtype: str
    max_model_len: int
    seed: int
    eos_token_ids: list[int]
    use_generation_config: bool  # False for --generation-config vllm
    chat_template: Union[str, None]  # the template text given with --chat-template
    tokenizer_files: dict[str, bytes]  # file name -> content (tokenizer.json, tokenizer_config.json, ...)
    logits_processors: list[str] = []  # names the workers registered (vllm_xargs.logits_processors must be one)
    runner: str = "generate"  # "generate" | "pooling"
    convert: str = "none"  # "none" | "embed" | "classify": a generative checkpoint served as a pooling model
    pooler: Union[PoolerInfo, None] = None  # pooling runner only
    score_template: Union[str, None] = None  # --score-template text: renders a query/document pair into one prompt


class EngineInfo(msgspec.Struct, **_WIRE):
    model: ModelInfo
    engine_addresses: list[str]  # index = data-parallel rank; "" while that rank has not registered yet


class EngineCoreOutputs(msgspec.Struct, **_WIRE):
    outputs: list[EngineCoreOutput] = []
    scheduler_stats: Union[SchedulerStats, None] = None
    engine_dead: bool = False  # sentinel: the core (or a worker) died; frontends answer 503 from now on
    engine_info: Union[EngineInfo, None] = None  # the answer to ClientHello(want_engine_info=True)


# --------------------------------------------------------------------------- KV transfer (disaggregated P/D)


class KVLoad(msgspec.Struct, **_WIRE):
    """Consumer side: fill `local_block_ids` with the producer's KV of `remote_block_ids` (same order)."""

    request_id: str
    local_block_ids: list[int]
    remote_engine_id: str
    remote_request_id: str
    remote_block_ids: list[int]
    remote_host: str
    remote_port: int
    storage_key: str = ""  # shared-storage connector: the folder holding the KV


class KVSave(msgspec.Struct, **_WIRE):
    """Producer side: `block_ids` of a finished request hold KV a consumer will fetch (pull or storage)."""

    request_id: str
    block_ids: list[int]
    storage_key: str = ""


class KVConnectorMetadata(msgspec.Struct, **_WIRE):
    """The scheduler-side connector's instructions for one step, applied by every rank before the forward."""

    loads: list[KVLoad] = []
    saves: list[KVSave] = []
    released_request_ids: list[str] = []  # producer: stop serving these (pulled elsewhere or lease expired)


class KVConnectorOutput(msgspec.Struct, **_WIRE):
    """One rank's transfer progress since its previous answer; the executor merges all ranks'."""

    finished_sending: list[str] = []
    finished_recving: list[str] = []
    failed_recving: dict[str, str] = {}  # request id -> why


class KVPullRequest(msgspec.Struct, **_WIRE):
    """Consumer worker -> producer worker (ZmqPullConnector side channel): send me these blocks' KV."""

    engine_id: str
    request_id: str
    block_ids: list[int]


class KVPullResponse(msgspec.Struct, **_WIRE):
    """The answer's first frame; then one frame per layer: `[2, len(block_ids), block_size, heads, head_dim]`."""

    error: Union[str, None] = None
    dtype: str = ""
    layer_shape: list[int] = []


# --------------------------------------------------------------------------- core -> workers


class NewRequestData(msgspec.Struct, **_WIRE):
    """A request the worker has not seen (or must forget and relearn after preemption)."""

    request_id: str
    token_ids: list[int]  # prompt followed by any tokens already generated (after preemption)
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # tokens whose KV is already in the cache (prefix-cache hits)
    eos_token_id: Union[int, None] = None  # masked until min_tokens are out
    pooling_params: Union[PoolingParams, None] = None  # a pooling request: pool once the prompt is computed
    audio: Union[AudioInput, None] = None  # encoder-decoder: encode once, at the first step (again after preemption)
    mm_items: list[MultiModalItem] = []  # encoded when a step first reaches their placeholders


class CachedRequestData(msgspec.Struct, **_WIRE):
    """Diff for a request the worker already knows."""

    request_id: str
    new_token_ids: list[int]  # tokens appended since the worker last saw it (the previous step's sample)
    new_block_ids: list[int]
    num_computed_tokens: int


class SchedulerOutput(msgspec.Struct, tag="step", **_WIRE):
    """One engine step. `num_scheduled_tokens[request_id]` tokens run for each listed request.

    A request whose `num_computed_tokens + num_scheduled_tokens` reaches its token count samples one token.
    Workers apply `finished_request_ids` before `new_requests`: an aborted id may come back as new in the same step.
    """

    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]
    finished_request_ids: list[str]  # forget these (finished, aborted or preempted)
    kv_connector_metadata: Union[KVConnectorMetadata, None] = None
    free_encoder_hashes: list[str] = []  # media embeddings (by content hash) no request needs any more


class InitializeCache(msgspec.Struct, tag="init_cache", **_WIRE):
    num_blocks: int


class Shutdown(msgspec.Struct, tag="shutdown", **_WIRE):
    pass


CoreToWorker = Union[SchedulerOutput, InitializeCache, Shutdown]


# --------------------------------------------------------------------------- workers -> core


class WorkerReady(msgspec.Struct, tag="ready", **_WIRE):
    rank: int
    num_blocks: int  # how many KV blocks this rank can hold; the core takes the minimum over ranks
    device: str
    kv_cache_dtype: str = ""  # the resolved --kv-cache-dtype, e.g. "float32"
    logits_processors: list[str] = []  # names registered in workers.sampling.logits_processors (frontends validate against)


class ModelRunnerOutput(msgspec.Struct, tag="result", **_WIRE):
    """Rank 0's answer to one `SchedulerOutput`.

    `sampled_token_ids[i]` is empty for a request whose prefill chunk did not reach the end of its tokens.
    """

    request_ids: list[str]
    sampled_token_ids: list[list[int]]
    logprobs: list[Union[list[TokenLogprobs], None]]
    error: Union[str, None] = None  # set when the step failed as a whole
    kv_connector_output: Union[KVConnectorOutput, None] = None
    rank: int = 0
    # Per request (same order), with prompt_logprobs: the logprobs of the prompt tokens computed in this step.
    prompt_logprobs: Union[list[Union[list[Union[TokenLogprobs, None]], None]], None] = None
    # Requests that failed on their own (their sampled list is empty), e.g. a logits processor error: id -> why.
    request_errors: Union[dict[str, str], None] = None
    # Per request (same order): the result of a pooling request whose prompt this step completed, else None.
    pooling_outputs: Union[list[Union[PoolingOutput, None]], None] = None
    num_encoded_items: int = 0  # media items the vision encoder ran on in this step


class WorkerFailure(msgspec.Struct, tag="failure", **_WIRE):
    rank: int
    message: str


WorkerToCore = Union[WorkerReady, ModelRunnerOutput, WorkerFailure]


# --------------------------------------------------------------------------- codecs

frontend_message_encoder = msgspec.msgpack.Encoder()
frontend_message_decoder = msgspec.msgpack.Decoder(FrontendMessage)
engine_outputs_encoder = msgspec.msgpack.Encoder()
engine_outputs_decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
core_to_worker_decoder = msgspec.msgpack.Decoder(CoreToWorker)
worker_to_core_decoder = msgspec.msgpack.Decoder(WorkerToCore)
kv_pull_request_decoder = msgspec.msgpack.Decoder(KVPullRequest)
kv_pull_response_decoder = msgspec.msgpack.Decoder(KVPullResponse)
