"""Request schemas of /v1/completions and /v1/chat/completions (plus vLLM's extra sampling fields)."""
from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import Field, ValidationInfo, field_validator, model_validator

from frontend.errors import BadRequestError
from frontend.protocol import INT64_MAX, INT64_MIN, ChatTemplateFields, OpenAIModel

MAX_LOGPROBS = 20

# vLLM's older guided decoding fields -> keys of structured_outputs.
_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar", "guided_whitespace_pattern": "whitespace_pattern"}



class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingRequest(OpenAIModel):
    """Fields shared by completions and chat completions. None means "not given" (defaults apply later)."""

    @model_validator(mode="before")
    @classmethod
    def _guided_to_structured_outputs(cls, data: Any) -> Any:
        """vLLM's older guided_json/guided_regex/... become structured_outputs, as vLLM users still send them."""
        if not isinstance(data, dict) or not any(data.get(name) is not None for name in _GUIDED_FIELDS):
            return data
        data = dict(data)
        guided = {key: data.pop(name) for name, key in _GUIDED_FIELDS.items() if data.get(name) is not None}
        if data.get("structured_outputs") is not None:
            raise BadRequestError("give structured_outputs or the older guided_* fields, not both",
                                  param="structured_outputs")
        data["structured_outputs"] = guided
        return data

    model: Optional[str] = None
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = Field(None, ge=0.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0)
    seed: Optional[int] = Field(None, ge=INT64_MIN, le=INT64_MAX - 1024)
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    cache_salt: Optional[str] = None
    kv_transfer_params: Optional[dict[str, Any]] = None  # disaggregated prefill/decode (see scripts/disagg_proxy.py)
    priority: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    echo: bool = False
    return_token_ids: bool = False  # vLLM: add prompt_token_ids and token_ids to the choices
    return_tokens_as_token_ids: bool = False  # vLLM: logprob tokens as "token_id:N"
    # vLLM sampling extras
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    prompt_logprobs: Optional[int] = Field(None, ge=-1, le=MAX_LOGPROBS)
    truncate_prompt_tokens: Optional[int] = Field(None, ge=-1)
    use_beam_search: bool = False
    length_penalty: float = 1.0
    # Structured outputs (vLLM's structured_outputs; OpenAI's response_format)
    structured_outputs: Optional[dict[str, Any]] = None
    response_format: Optional[dict[str, Any]] = None
    repetition_detection: Optional[dict[str, Any]] = None
    vllm_xargs: Optional[dict[str, Any]] = None  # passed to the logits processors it names (workers/logits_processors)
    request_id: Optional[str] = None  # echoed in the response id and the logs
    stream_interval: int = Field(1, ge=1)  # tokens per streamed chunk at most every N tokens

    @field_validator("kv_transfer_params")
    @classmethod
    def _one_choice_per_transfer(cls, params: Optional[dict[str, Any]],
                                 info: ValidationInfo) -> Optional[dict[str, Any]]:
        if params is not None and info.data.get("n", 1) != 1:
            raise ValueError("kv_transfer_params needs n == 1 (one prompt KV hand-off per request)")
        return params

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [stop_str for stop_str in stops if stop_str]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """vLLM's `stream_options.continuous_usage_stats`: usage so far in every chunk."""
        return bool(self.include_usage and self.stream_options and self.stream_options.continuous_usage_stats)


PromptInput = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(SamplingRequest):
    prompt: PromptInput
    max_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    add_special_tokens: bool = True
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: PromptInput) -> PromptInput:
        if isinstance(prompt, list) and (not prompt or any(isinstance(item, list) and not item for item in prompt)):
            raise ValueError("the prompt must not be empty")
        return prompt

    @field_validator("suffix")
    @classmethod
    def _check_suffix(cls, suffix: Optional[str]) -> Optional[str]:
        if suffix:
            raise ValueError("suffix is not supported")
        return suffix

    @field_validator("best_of")
    @classmethod
    def _check_best_of(cls, best_of: Optional[int], info: ValidationInfo) -> Optional[int]:
        if best_of is not None and best_of != info.data.get("n", 1):
            raise ValueError("best_of is not supported (only best_of == n)")
        return best_of


class ChatCompletionRequest(SamplingRequest, ChatTemplateFields):
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    add_special_tokens: bool = False

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, top_logprobs: Optional[int], info: ValidationInfo) -> Optional[int]:
        if top_logprobs is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return top_logprobs

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
