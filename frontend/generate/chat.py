"""POST /v1/chat/completions: render the chat template -> tokenize -> fan out -> aggregate or stream."""
from __future__ import annotations

import time
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import Request

from frontend.detokenizer import TokenRecord
from frontend.errors import APIError, error_event
from frontend.generate.beam_search import beam_search_all, beam_usage, check_beam_search_request, hypothesis_text
from frontend.generate.chat_prompt import attach_chat_media, render_chat_prompt
from frontend.generate.choices import (Choice, api_request_id, every_n_tokens, kv_transfer_params, make_choices,
                                       run_choices, truncate_prompt, usage)
from frontend.generate.logprobs import chat_logprobs, prompt_logprobs_json
from frontend.generate.protocol import ChatCompletionRequest
from frontend.generate.sampling import check_context_length, default_max_tokens
from frontend.generate.tool_calling import ChoiceToolOutput, ToolPlan, constrain_choices, plan_tools, request_for_engine
from frontend.state import FrontendState
from frontend.streaming import SSE_DONE, ClientDisconnected, sse_event, unless_disconnected


class ChatServing:
    def __init__(self, frontend: FrontendState) -> None:
        self.frontend = frontend

    async def create(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        frontend = self.frontend
        frontend.check_model(request.model)
        frontend.check_engine_alive()
        frontend.check_generative("/v1/chat/completions")
        tools = plan_tools(request, frontend.frontend_config)
        prompt = render_chat_prompt(frontend, request, tools.template_tools, images_endpoint="/v1/chat/completions")
        prompt_token_ids, mm_items = await attach_chat_media(
            frontend, request, frontend.tokenizer.encode(prompt, request.add_special_tokens))
        prompt_token_ids = truncate_prompt(prompt_token_ids, request.truncate_prompt_tokens,
                                           frontend.model_config.max_model_len)
        max_model_len = frontend.model_config.max_model_len
        max_tokens = default_max_tokens(request.requested_max_tokens, frontend.generation_defaults,
                                        max_model_len - len(prompt_token_ids))
        check_context_length(len(prompt_token_ids), max(max_tokens, 1), max_model_len, what="messages")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        request_id = api_request_id("chatcmpl", request, raw_request.headers)
        if request.use_beam_search:
            return JSONResponse(await self._beam_search(request, request_id, prompt_token_ids, max_tokens))
        choices = make_choices(frontend, request_for_engine(tools, request), request_id, [prompt_token_ids],
                               [max_tokens], logprobs, mm_items)
        constrain_choices(tools, choices)
        role = "assistant"  # the model wrote it, even when continuing a user's message (OpenAI's types allow no other)
        last = request.messages[-1]
        echo_text = last.text() if request.echo and last.role == role else ""
        header = {"id": request_id, "created": int(time.time()), "model": frontend.model_config.served_model_name}
        if request.stream:
            return StreamingResponse(self._stream(request, choices, header, role, echo_text, tools),
                                     media_type="text/event-stream")
        try:
            body = await unless_disconnected(raw_request,
                                             self._collect(request, choices, header, role, echo_text, tools))
        except ClientDisconnected:
            return Response(status_code=499)
        return JSONResponse(body)

    async def _beam_search(self, request: ChatCompletionRequest, request_id: str, prompt_token_ids: list[int],
                           max_tokens: int) -> dict[str, Any]:
        check_beam_search_request(request, request.logprobs)
        results = await beam_search_all(self.frontend, request, request_id, [prompt_token_ids], [max_tokens])
        choices: list[dict[str, Any]] = [{"index": rank, "logprobs": None, "finish_reason": "stop" if h.finished_by_stop else "length",
                    "stop_reason": None,
                    "message": {"role": "assistant", "content": hypothesis_text(self.frontend, request, h),
                                "refusal": None, "tool_calls": []}}
                   for rank, h in enumerate(results[0])]
        return {"id": request_id, "created": int(time.time()), "model": self.frontend.model_config.served_model_name,
                "object": "chat.completion", "choices": choices, "usage": beam_usage([prompt_token_ids], results)}

    def _logprobs(self, request: ChatCompletionRequest, records: list[TokenRecord]) -> dict[str, Any] | None:
        if not request.logprobs:
            return None
        return chat_logprobs(self.frontend.tokenizer, records, request.top_logprobs or 0,
                             request.return_tokens_as_token_ids)

    async def _collect(self, request: ChatCompletionRequest, choices: list[Choice], header: dict[str, Any],
                       role: str, echo_text: str, tools: ToolPlan) -> dict[str, Any]:
        records: list[list[TokenRecord]] = [[] for _ in choices]
        async for delta in run_choices(self.frontend, choices):
            records[delta.index].extend(delta.tokens)
        body_choices = []
        for choice in choices:
            message, finish_reason = ChoiceToolOutput(tools).message(role, echo_text, choice.state.text,
                                                                     choice.state.finish_reason)
            body_choices.append({
                "index": choice.state.index, "message": message,
                "logprobs": self._logprobs(request, records[choice.state.index]),
                "finish_reason": finish_reason, "stop_reason": choice.state.stop_reason,
                **({"token_ids": choice.state.token_ids} if request.return_token_ids else {}),
            })
        body = {**header, "object": "chat.completion", "choices": body_choices, "usage": usage(choices),
                **kv_transfer_params(choices),
                # vLLM puts the (shared) prompt's logprobs on the response, not on each choice
                "prompt_logprobs": prompt_logprobs_json(self.frontend.tokenizer, choices[0].prompt_token_ids,
                                                        choices[0].state.prompt_logprobs,
                                                        request.return_tokens_as_token_ids)}
        if request.return_token_ids:
            body["prompt_token_ids"] = choices[0].prompt_token_ids
        return body

    async def _stream(self, request: ChatCompletionRequest, choices: list[Choice], header: dict[str, Any],
                      role: str, echo_text: str, tools: ToolPlan) -> AsyncIterator[str]:
        chunk_header: dict[str, Any] = {**header, "object": "chat.completion.chunk"}
        if request.include_usage:
            chunk_header["usage"] = None

        def chunk(index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None = None,
                  finish_reason: str | None = None, stop_reason: int | str | None = None,
                  token_ids: list[int] | None = None) -> str:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            if finish_reason is not None:
                choice["stop_reason"] = stop_reason
            if token_ids is not None:
                choice["token_ids"] = token_ids
            if request.continuous_usage:
                return sse_event({**chunk_header, "choices": [choice], "usage": usage(choices)})
            return sse_event({**chunk_header, "choices": [choice]})

        try:
            if request.return_token_ids:
                chunk_header["prompt_token_ids"] = choices[0].prompt_token_ids
            for choice in choices:
                yield chunk(choice.state.index, {"role": role, "content": ""})
            chunk_header.pop("prompt_token_ids", None)  # only on the role chunks
            for choice in choices if echo_text else []:
                yield chunk(choice.state.index, {"content": echo_text})
            outputs = {choice.state.index: ChoiceToolOutput(tools) for choice in choices}
            async for delta in every_n_tokens(run_choices(self.frontend, choices), request.stream_interval):
                token_ids = [record.token_id for record in delta.tokens] if request.return_token_ids else None
                message_delta, finish_reason = outputs[delta.index].stream(delta.text, delta.finish_reason)
                logprobs = self._logprobs(request, delta.tokens)
                if message_delta or finish_reason is not None or logprobs is not None or token_ids is not None:
                    yield chunk(delta.index, message_delta, logprobs, finish_reason, delta.stop_reason, token_ids)
            if request.include_usage:
                yield sse_event({**chunk_header, "choices": [], "usage": usage(choices)})
        except APIError as exc:
            yield error_event(exc)
        yield SSE_DONE
