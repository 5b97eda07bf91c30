"""POST /v1/completions: validate -> tokenize -> fan out -> aggregate or stream (legacy completions shape)."""
from __future__ import annotations

import time
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import Request

from frontend.detokenizer import TokenRecord
from frontend.errors import APIError, BadRequestError, error_event
from frontend.generate.beam_search import beam_search_all, beam_usage, check_beam_search_request, hypothesis_text
from frontend.generate.choices import (Choice, api_request_id, every_n_tokens, kv_transfer_params, make_choices,
                                       run_choices, truncate_prompt, usage)
from frontend.generate.logprobs import completion_logprobs, prompt_logprobs_json
from frontend.generate.protocol import CompletionRequest
from frontend.generate.sampling import check_context_length, default_max_tokens
from frontend.state import FrontendState
from frontend.streaming import SSE_DONE, ClientDisconnected, sse_event, unless_disconnected
from frontend.tokenizer import check_token_ids

_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for legacy completions


def _token_id_prompts(prompt: list[Any]) -> list[list[int]]:
    """`[1, 2, 3]` is one prompt, `[[1, 2], [3]]` two."""
    if all(isinstance(item, int) for item in prompt):
        return [[int(token) for token in prompt]]
    return [[int(token) for token in item] for item in prompt]


class CompletionServing:
    def __init__(self, frontend: FrontendState) -> None:
        self.frontend = frontend

    async def create(self, request: CompletionRequest, raw_request: Request) -> Response:
        frontend = self.frontend
        frontend.check_model(request.model)
        frontend.check_engine_alive()
        frontend.check_generative("/v1/completions")
        prompts, prompt_texts = self._tokenize_prompts(request)
        max_model_len = frontend.model_config.max_model_len
        max_tokens: list[int] = []
        for prompt_token_ids in prompts:
            limit = default_max_tokens(request.max_tokens, frontend.generation_defaults, _DEFAULT_MAX_TOKENS)
            if request.max_tokens is None:  # an implicit default shrinks to fit; an explicit one must fit
                limit = max(1, min(limit, max_model_len - len(prompt_token_ids)))
            check_context_length(len(prompt_token_ids), limit, max_model_len)
            max_tokens.append(limit)
        request_id = api_request_id("cmpl", request, raw_request.headers)
        if request.use_beam_search:
            return JSONResponse(await self._beam_search(request, request_id, prompts, max_tokens))
        choices = make_choices(frontend, request, request_id, prompts, max_tokens, request.logprobs)
        header = {"id": request_id, "created": int(time.time()), "model": frontend.model_config.served_model_name}
        echo_texts = prompt_texts if request.echo else [""] * len(prompts)
        if request.stream:
            return StreamingResponse(self._stream(request, choices, header, echo_texts),
                                     media_type="text/event-stream")
        try:
            body = await unless_disconnected(raw_request, self._collect(request, choices, header, echo_texts))
        except ClientDisconnected:
            return Response(status_code=499)
        return JSONResponse(body)

    async def _beam_search(self, request: CompletionRequest, request_id: str, prompts: list[list[int]],
                           max_tokens: list[int]) -> dict[str, Any]:
        check_beam_search_request(request, request.logprobs is not None)
        results = await beam_search_all(self.frontend, request, request_id, prompts, max_tokens)
        choices = [{"index": prompt_index * request.n + rank, "text": hypothesis_text(self.frontend, request, h),
                    "logprobs": None, "finish_reason": "stop" if h.finished_by_stop else "length",
                    "stop_reason": None, "prompt_logprobs": None}
                   for prompt_index, hypotheses in enumerate(results) for rank, h in enumerate(hypotheses)]
        return {"id": request_id, "created": int(time.time()), "model": self.frontend.model_config.served_model_name,
                "object": "text_completion", "choices": choices, "usage": beam_usage(prompts, results)}

    def _tokenize_prompts(self, request: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        """Token ids of each prompt and its text (for echo)."""
        tokenizer = self.frontend.tokenizer
        prompt = request.prompt
        if isinstance(prompt, str):
            texts = [prompt]
        elif all(isinstance(item, str) for item in prompt):
            texts = [str(item) for item in prompt]
        else:
            prompts = [truncate_prompt(tokens, request.truncate_prompt_tokens, self.frontend.model_config.max_model_len)
                       for tokens in _token_id_prompts(prompt)]
            for tokens in prompts:
                check_token_ids(tokens, tokenizer, "prompt")
            return prompts, [tokenizer.decode(tokens, skip_special_tokens=False) for tokens in prompts]
        prompts = [truncate_prompt(tokenizer.encode(text, request.add_special_tokens), request.truncate_prompt_tokens,
                                   self.frontend.model_config.max_model_len) for text in texts]
        if any(not tokens for tokens in prompts):
            raise BadRequestError("the prompt is empty after tokenization", param="prompt")
        return prompts, texts

    def _choice_logprobs(self, request: CompletionRequest, records: list[TokenRecord],
                         echo_text: str) -> dict[str, Any] | None:
        if request.logprobs is None:
            return None
        return completion_logprobs(self.frontend.tokenizer, records, len(echo_text), request.logprobs,
                                   request.return_tokens_as_token_ids)

    async def _collect(self, request: CompletionRequest, choices: list[Choice], header: dict[str, Any],
                       echo_texts: list[str]) -> dict[str, Any]:
        records: list[list[TokenRecord]] = [[] for _ in choices]
        async for delta in run_choices(self.frontend, choices):
            records[delta.index].extend(delta.tokens)
        body_choices = []
        for choice in choices:
            state = choice.state
            echo_text = echo_texts[state.prompt_index]
            body_choice = {
                "index": state.index, "text": echo_text + state.text,
                "logprobs": self._choice_logprobs(request, records[state.index], echo_text),
                "finish_reason": state.finish_reason, "stop_reason": state.stop_reason,
                "prompt_logprobs": prompt_logprobs_json(self.frontend.tokenizer, choice.prompt_token_ids,
                                                        state.prompt_logprobs, request.return_tokens_as_token_ids)}
            if request.return_token_ids:
                body_choice.update(prompt_token_ids=choice.prompt_token_ids, token_ids=state.token_ids)
            body_choices.append(body_choice)
        return {**header, "object": "text_completion", "choices": body_choices, "usage": usage(choices),
                **kv_transfer_params(choices)}

    async def _stream(self, request: CompletionRequest, choices: list[Choice], header: dict[str, Any],
                      echo_texts: list[str]) -> AsyncIterator[str]:
        chunk_header = {**header, "object": "text_completion"}
        first_chunk = [True] * len(choices)
        try:
            async for delta in every_n_tokens(run_choices(self.frontend, choices), request.stream_interval):
                first, first_chunk[delta.index] = first_chunk[delta.index], False
                echo_text = echo_texts[choices[delta.index].state.prompt_index]
                choice = {"index": delta.index, "text": echo_text + delta.text if first else delta.text,
                          "logprobs": self._choice_logprobs(request, delta.tokens, echo_text),
                          "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}
                if request.return_token_ids:
                    choice["token_ids"] = [record.token_id for record in delta.tokens]
                    if first:
                        choice["prompt_token_ids"] = choices[delta.index].prompt_token_ids
                yield sse_event({**chunk_header, "choices": [choice],
                                 "usage": usage(choices) if request.continuous_usage else None})
            if request.include_usage:
                yield sse_event({**chunk_header, "choices": [], "usage": usage(choices)})
        except APIError as exc:
            yield error_event(exc)
        yield SSE_DONE
