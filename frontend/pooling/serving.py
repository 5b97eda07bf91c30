"""What every pooling endpoint shares: check that the model serves the task, turn inputs into prompts, run one
engine request per prompt (all submitted at once, so the engine batches them) and collect the pooled results.

Engine request `i` of an API request with id `ID` is `ID-i`; a pooling request answers with exactly one output.
Chat `messages` may carry image parts on a vision-language model: they are fetched, prepared and attached at their
placeholders by frontend/multimodal/chat_media.py exactly as for chat, and travel as the prompt's `mm_items`.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import msgspec
import numpy as np

from engine_core.config import PoolerConfig
from engine_core.protocol import EngineCoreOutput, EngineCoreRequest, MultiModalItem, PoolingParams, SamplingParams
from frontend.chat_template import ChatTemplate, ChatTemplateError, request_chat_template
from frontend.errors import BadRequestError, InternalServerError, engine_error
from frontend.generate.chat_prompt import media_options, render_chat_prompt
from frontend.multimodal.chat_media import attach_media, media_refs, prepare_media
from frontend.pooling.encoding import pooled_array
from frontend.pooling.protocol import InputFields, PoolingInput, PoolingRequestBase
from frontend.protocol import ChatTemplateFields
from frontend.request_log import log_engine_request
from frontend.state import FrontendState
from frontend.tokenizer import EncodedPrompt, check_token_ids

# The endpoint to use for each task, named in errors.
TASK_ENDPOINTS = {"embed": "/v1/embeddings", "classify": "/classify", "score": "/score or /rerank",
                  "token_embed": "/pooling", "token_classify": "/pooling"}


@dataclass(frozen=True)
class PoolingPrompt:
    """One engine request's prompt; `token_type_ids` only for a text pair (BERT segment ids); `mm_items` the images
    at their expanded placeholders (their tokens count in usage like any other)."""

    token_ids: list[int]
    token_type_ids: Optional[list[int]] = None
    mm_items: tuple[MultiModalItem, ...] = ()


@dataclass(frozen=True)
class PooledResult:
    values: np.ndarray[Any, np.dtype[np.float32]]  # [n] for a sequence result, [num_tokens, n] per token
    num_prompt_tokens: int


def pooling_request_id(prefix: str, request: PoolingRequestBase, headers: Mapping[str, str]) -> str:
    """The response id: the request's `request_id` (vLLM), else an X-Request-Id header, else a random one."""
    return f"{prefix}-{request.request_id or headers.get('x-request-id') or uuid.uuid4().hex}"


def require_pooler(frontend: FrontendState, endpoint: str) -> PoolerConfig:
    """400 naming the flags that make a pooling model, when this one generates text."""
    config = frontend.model_config
    if frontend.is_speech_model:
        frontend.check_generative(endpoint)  # 400: a speech model takes audio
    if config.runner != "pooling" or config.pooler is None:
        raise BadRequestError(
            f"{endpoint} needs a pooling model, but this model is served with --runner {config.runner}: start the "
            "server with --runner pooling (a generative checkpoint also needs --convert embed or --convert "
            "classify) to serve embeddings, classification or scores", param="model")
    return config.pooler


def require_task(frontend: FrontendState, task: str, endpoint: str) -> PoolerConfig:
    """The model's pooler, or 400 naming the tasks (and endpoints) the model does serve."""
    pooler = require_pooler(frontend, endpoint)
    if task not in pooler.tasks:
        served = ", ".join(f"{name} ({TASK_ENDPOINTS[name]})" for name in pooler.tasks)
        kind = "an embedding model" if "embed" in pooler.tasks else "a classification model"
        raise BadRequestError(f"{endpoint} needs a model that supports the {task!r} task, but this is {kind}: it "
                              f"supports {served}", param="model")
    return pooler


def truncation_length(frontend: FrontendState, truncate_prompt_tokens: Optional[int]) -> Optional[int]:
    """vLLM's truncate_prompt_tokens: None (no truncation), -1 (the context length) or at most the context length."""
    max_model_len = frontend.model_config.max_model_len
    if truncate_prompt_tokens is None:
        return None
    if truncate_prompt_tokens > max_model_len:
        raise BadRequestError(f"truncate_prompt_tokens ({truncate_prompt_tokens}) is larger than the maximum "
                              f"context length ({max_model_len})", param="truncate_prompt_tokens")
    return max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens


def truncation_side(frontend: FrontendState, request: PoolingRequestBase) -> str:
    side = request.truncation_side or frontend.tokenizer.config.get("truncation_side") or "right"
    return str(side)


def check_prompt_length(frontend: FrontendState, num_tokens: int, param: str, index: int | None = None) -> None:
    max_model_len = frontend.model_config.max_model_len
    if num_tokens > max_model_len:
        where = "the input" if index is None else f"input {index}"
        raise BadRequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested {num_tokens} "
            f"tokens in {where}. Please reduce the length of the input, or set truncate_prompt_tokens (-1 truncates "
            "to the maximum context length).", param=param)


def encoded_text(frontend: FrontendState, request: PoolingRequestBase, text: str, param: str,
                 index: int | None = None, pair: str | None = None,
                 add_special_tokens: bool | None = None) -> EncodedPrompt:
    """A text's (or a text pair's) tokens, truncated as the request asks (special tokens kept), and checked
    against the context length. `add_special_tokens` None: the request's."""
    if add_special_tokens is None:
        add_special_tokens = request.add_special_tokens
    encoded = frontend.tokenizer.encode_prompt(
        text, pair, add_special_tokens=add_special_tokens or pair is not None,
        max_num_tokens=truncation_length(frontend, request.truncate_prompt_tokens),
        truncation_side=truncation_side(frontend, request))
    if encoded.num_content_tokens == 0:
        where = "the input" if index is None else f"input {index}"
        raise BadRequestError(f"{where} is empty after tokenization", param=param)
    check_prompt_length(frontend, len(encoded.token_ids), param, index)
    return encoded


def token_id_prompt(frontend: FrontendState, request: PoolingRequestBase, token_ids: list[int], param: str,
                    index: int | None = None) -> PoolingPrompt:
    check_token_ids(token_ids, frontend.tokenizer, param)
    keep = truncation_length(frontend, request.truncate_prompt_tokens)
    if keep is not None and len(token_ids) > keep:
        token_ids = token_ids[-keep:] if truncation_side(frontend, request) == "left" else token_ids[:keep]
    check_prompt_length(frontend, len(token_ids), param, index)
    return PoolingPrompt(token_ids)


def input_prompts(frontend: FrontendState, request: PoolingRequestBase, value: PoolingInput) -> list[PoolingPrompt]:
    """`input`: a text, texts, one list of token ids, or several."""
    items: Sequence[Any] = [value] if isinstance(value, str) else value
    if items and all(isinstance(item, int) for item in items):
        return [token_id_prompt(frontend, request, [int(token) for token in items], "input")]
    prompts = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            prompts.append(PoolingPrompt(encoded_text(frontend, request, item, "input", index).token_ids))
        else:
            prompts.append(token_id_prompt(frontend, request, [int(token) for token in item], "input", index))
    return prompts


async def chat_prompt(frontend: FrontendState, request: PoolingRequestBase, fields: ChatTemplateFields,
                      endpoint: str, param: str = "messages", index: int | None = None,
                      add_special_tokens: bool | None = None) -> PoolingPrompt:
    """`fields.messages` rendered with the chat template and tokenized like an input text; their images (refused
    for a model without vision) fetched and prepared off the event loop and attached at their placeholders."""
    text = render_chat_prompt(frontend, fields, images_endpoint=endpoint)
    refs, vision = media_refs(fields.messages), frontend.vision
    if refs and request.truncate_prompt_tokens is not None:
        raise BadRequestError("truncate_prompt_tokens is not supported with images", param="truncate_prompt_tokens")
    encoded = encoded_text(frontend, request, text, param, index, add_special_tokens=add_special_tokens)
    if not refs or vision is None:
        return PoolingPrompt(encoded.token_ids)
    prepared = await prepare_media(refs, vision, media_options(frontend, fields))
    token_ids, items = attach_media(encoded.token_ids, prepared, vision)
    check_prompt_length(frontend, len(token_ids), param, index)  # now with each image's placeholder tokens
    return PoolingPrompt(token_ids, mm_items=tuple(items))


async def request_prompts(frontend: FrontendState, request: PoolingRequestBase, endpoint: str) -> list[PoolingPrompt]:
    """The prompts of an `input` request (one per item), or the one prompt of a chat `messages` request."""
    if isinstance(request, InputFields):
        return input_prompts(frontend, request, request.input)
    assert isinstance(request, ChatTemplateFields)
    return [await chat_prompt(frontend, request, request, endpoint)]


def template_for_request(frontend: FrontendState, source: str | None,
                         param: str = "chat_template") -> ChatTemplate | None:
    """A request's own template (compiled), refused without --trust-request-chat-template as chat does."""
    if source is None:
        return None
    if not frontend.frontend_config.trust_request_chat_template:
        raise BadRequestError("a template is passed with the request, but --trust-request-chat-template is not set: "
                              "refused the untrusted template", param=param)
    try:
        return request_chat_template(source, frontend.tokenizer.special_tokens)
    except ChatTemplateError as exc:
        raise BadRequestError(str(exc), param=param) from exc


async def run_pooling(frontend: FrontendState, request_id: str, request: PoolingRequestBase,
                      prompts: list[PoolingPrompt], params: PoolingParams) -> list[PooledResult]:
    """Submit every prompt at once and wait for all results (in prompt order). The first failure cancels the
    rest, which aborts them in the engine."""
    frontend.check_engine_alive()
    arrival_time = time.time()
    engine_requests = [
        EngineCoreRequest(request_id=f"{request_id}-{index}", prompt_token_ids=prompt.token_ids,
                          sampling_params=SamplingParams(), eos_token_id=None, arrival_time=arrival_time,
                          priority=request.priority, cache_salt=request.cache_salt,
                          client_index=frontend.engine.client_index, mm_items=list(prompt.mm_items),
                          pooling_params=params if prompt.token_type_ids is None
                          else msgspec.structs.replace(params, token_type_ids=prompt.token_type_ids))
        for index, prompt in enumerate(prompts)]
    tasks = [asyncio.ensure_future(_pool_one(frontend, engine_request)) for engine_request in engine_requests]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()  # no-op for the finished ones; aborts the others after a failure or a disconnect


async def _pool_one(frontend: FrontendState, engine_request: EngineCoreRequest) -> PooledResult:
    final: EngineCoreOutput | None = None
    log_engine_request(frontend, engine_request)
    async for output in frontend.engine.generate(engine_request):
        if output.finished:
            final = output
    assert final is not None  # generate() ends with a finished output or raises
    if final.finish_reason == "error":
        raise engine_error(str(final.stop_reason))
    if final.pooling_output is None:
        raise InternalServerError(f"the engine finished request {engine_request.request_id} without a pooled result "
                                  f"(finish reason {final.finish_reason!r})")
    num_prompt_tokens = len(engine_request.prompt_token_ids)
    frontend.metrics.observe_finished(num_prompt_tokens, 0, final.finish_reason or "stop",
                                      time.time() - engine_request.arrival_time, None)
    return PooledResult(pooled_array(final.pooling_output), num_prompt_tokens)


def usage(results: list[PooledResult]) -> dict[str, int]:
    prompt_tokens = sum(result.num_prompt_tokens for result in results)
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
