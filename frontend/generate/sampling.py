"""Request fields -> `SamplingParams`, with defaults from generation_config.json (frontend/generation_config.py)
and the model's EOS ids."""
from __future__ import annotations

from collections.abc import Collection
from typing import Any

from engine_core.protocol import SamplingParams
from frontend.errors import BadRequestError
from frontend.generate import sampling_extras
from frontend.generate.protocol import SamplingRequest
from frontend.generate.structured_outputs import structured_output_spec
from frontend.generation_config import EosConfig
from frontend.tokenizer import TokenizerInfo, check_token_ids


def check_context_length(num_prompt_tokens: int, max_tokens: int, max_model_len: int,
                         what: str = "prompt") -> None:
    """400 when prompt + completion would not fit the context window."""
    if num_prompt_tokens + max_tokens > max_model_len:
        raise BadRequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {what}, {max_tokens} in the "
            f"completion). Please reduce the length of the {what} or completion.", param="max_tokens")


def _logit_bias(request: SamplingRequest, tokenizer: TokenizerInfo) -> dict[int, float] | None:
    if not request.logit_bias:
        return None
    bias: dict[int, float] = {}
    for key, value in request.logit_bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise BadRequestError(f"invalid value for 'logit_bias': keys must be token ids, got {key!r}",
                                  param="logit_bias") from None
        check_token_ids([token_id], tokenizer, "logit_bias")
        bias[token_id] = max(-100.0, min(100.0, float(value)))
    return bias


def build_sampling_params(request: SamplingRequest, defaults: dict[str, Any], eos: EosConfig,
                          tokenizer: TokenizerInfo, *, max_tokens: int, logprobs: int | None,
                          seed_offset: int, logits_processor_names: Collection[str] = ()) -> SamplingParams:
    """One engine request's params; `seed_offset` (the choice's index among n) keeps n samples distinct.
    `logits_processor_names`: what the engine's workers registered (vllm_xargs may select only those)."""

    def pick(name: str, fallback: Any) -> Any:
        value = getattr(request, name)
        return value if value is not None else defaults.get(name, fallback)

    stop_token_ids = list(request.stop_token_ids or [])
    check_token_ids(stop_token_ids, tokenizer, "stop_token_ids")
    stop_token_ids += [token_id for token_id in eos.extra_stop_token_ids if token_id not in stop_token_ids]
    top_k = int(pick("top_k", 0))
    processors, processor_args = sampling_extras.logits_processors(request, logits_processor_names)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(pick("temperature", 1.0)),
        top_p=float(pick("top_p", 1.0)),
        top_k=0 if top_k < 0 else top_k,
        min_p=float(pick("min_p", 0.0)),
        presence_penalty=float(request.presence_penalty or 0.0),
        frequency_penalty=float(request.frequency_penalty or 0.0),
        repetition_penalty=float(pick("repetition_penalty", 1.0)),
        seed=None if request.seed is None else request.seed + seed_offset,
        min_tokens=request.min_tokens or 0,
        stop_token_ids=stop_token_ids,
        ignore_eos=bool(request.ignore_eos),
        logprobs=logprobs,
        logit_bias=_logit_bias(request, tokenizer),
        structured_output=structured_output_spec(request),
        prompt_logprobs=sampling_extras.prompt_logprobs(request),
        allowed_token_ids=sampling_extras.allowed_token_ids(request, tokenizer),
        bad_words_token_ids=sampling_extras.bad_words_token_ids(request, tokenizer),
        repetition_detection=sampling_extras.repetition_detection(request),
        logits_processors=processors,
        logits_processor_args=processor_args,
    )


def default_max_tokens(request_max_tokens: int | None, defaults: dict[str, Any], fallback: int) -> int:
    """The request's max_tokens, else generation_config's max_new_tokens, else `fallback`."""
    if request_max_tokens is not None:
        return request_max_tokens
    configured = defaults.get("max_tokens")
    return min(int(configured), fallback) if configured else fallback
