"""POST /v1/responses (and GET / cancel / DELETE of stored responses): OpenAI's Responses API.

A request is translated into chat terms (generate/responses/protocol.py) and goes through chat's code for the template,
tools, structured outputs and sampling. One code path then produces the response: `_events` runs the engine
request and yields OpenAI's typed stream events in order while it fills a `ResponseObject`:
response.created, response.in_progress, then per output item response.output_item.added ... .done — a message
(response.content_part.added, response.output_text.delta..., response.output_text.done,
response.content_part.done) or, when a tool parser finds calls, function_call items
(response.function_call_arguments.delta..., .done) — and last response.completed | response.incomplete.
A plain request drains the events and answers the final object; `stream: true` sends them as SSE
(`event: TYPE` + `data: JSON`, no `[DONE]`, as OpenAI does); `background: true` (store on) runs them in a task
whose events a stream (or `GET ?stream=true&starting_after=N`) replays, and that `cancel` stops. The items and
events themselves are built in events.py.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, AsyncIterator, Mapping

from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.requests import Request

from frontend.detokenizer import TokenRecord
from frontend.errors import APIError, BadRequestError, NotFoundError, validation_error
from frontend.generate.chat_prompt import attach_chat_media, render_chat_prompt
from frontend.generate.choices import Choice, every_n_tokens, make_choices, run_choices, truncate_prompt
from frontend.generate.logprobs import chat_logprobs
from frontend.generate.protocol import ChatCompletionRequest
from frontend.generate.responses.events import OutputWriter, ResponseRun, close_items, sse, usage
from frontend.generate.responses.protocol import (ResponsesRequest, chat_tool_choice, chat_tools, echo_tools,
                                                  input_to_messages, output_to_messages, response_format,
                                                  responses_error, text_format)
from frontend.generate.responses.store import (ACTIVE_STATUSES, ResponseObject, ResponseStore, StoredResponse,
                                               store_enabled_from_env)
from frontend.generate.sampling import check_context_length, default_max_tokens
from frontend.generate.tool_calling import constrain_choices, plan_tools, request_for_engine
from frontend.state import FrontendState
from frontend.streaming import ClientDisconnected, unless_disconnected

logger = logging.getLogger("conveyor.frontend")

_STORE_DISABLED = ("the response store is disabled on this server (start it with "
                   "VLLM_ENABLE_RESPONSES_API_STORE=1 to keep responses for retrieval, cancellation and "
                   "previous_response_id)")


class ResponsesServing:
    def __init__(self, frontend: FrontendState, store_enabled: bool | None = None) -> None:
        self.frontend = frontend
        self.store = ResponseStore(store_enabled_from_env() if store_enabled is None else store_enabled)
        if self.store.enabled:
            logger.info("Responses API store on (VLLM_ENABLE_RESPONSES_API_STORE): at most %d responses kept in "
                        "this frontend process's memory", self.store.capacity)

    # ------------------------------------------------------------------ POST /v1/responses

    async def create(self, request: ResponsesRequest, raw_request: Request) -> Response:
        self.frontend.check_model(request.model)
        self.frontend.check_engine_alive()
        self.frontend.check_generative("/v1/responses")
        if request.background and not self.store.enabled:
            raise BadRequestError("background responses need the response store: " + _STORE_DISABLED,
                                  param="background")
        if request.background and not request.store:
            raise BadRequestError("background responses must be stored: background=true requires store=true",
                                  param="background")
        run = await self._prepare(request, self._previous(request), raw_request.headers)
        if request.background:
            entry = StoredResponse(run.response, run.conversation, run.call_names,
                                   events=[] if request.stream else None)
            self.store.put(entry)
            entry.task = asyncio.create_task(self._run_background(run, entry), name=f"response-{run.response.id}")
            if request.stream:
                return StreamingResponse(self._replay(entry, None), media_type="text/event-stream")
            return JSONResponse(run.response.to_dict())
        if request.stream:
            return StreamingResponse(self._stream(run), media_type="text/event-stream")
        try:
            body = await unless_disconnected(raw_request, self._collect(run))
        except ClientDisconnected:
            return Response(status_code=499)
        return JSONResponse(body)

    def _previous(self, request: ResponsesRequest) -> StoredResponse | None:
        response_id = request.previous_response_id
        if response_id is None:
            return None
        if not self.store.enabled:
            raise NotFoundError(f"invalid value for 'previous_response_id': response '{response_id}' not found: "
                                f"{_STORE_DISABLED}.", param="previous_response_id")
        entry = self.store.get(response_id)
        if entry is None:
            raise NotFoundError(f"invalid value for 'previous_response_id': response '{response_id}' not found.",
                                param="previous_response_id")
        if entry.active:
            raise BadRequestError(f"invalid value for 'previous_response_id': response '{response_id}' is still "
                                  "in progress",
                                  param="previous_response_id")
        return entry

    async def _prepare(self, request: ResponsesRequest, previous: StoredResponse | None,
                 headers: Mapping[str, str]) -> ResponseRun:
        """Validate and translate: chat messages -> prompt tokens -> one engine request; the response header.
        Tools, the template, structured outputs and sampling go through chat's code; its errors are renamed
        to the Responses fields."""
        frontend = self.frontend
        call_names = dict(previous.call_names) if previous is not None else {}
        history = [] if previous is None else \
            previous.messages + output_to_messages(previous.response.output, call_names)
        conversation = history + input_to_messages(request, call_names)
        if not conversation:
            raise BadRequestError("'input' must not be empty", param="input")
        instructions = [] if request.instructions is None else \
            [{"role": "system", "content": [{"type": "text", "text": request.instructions}]}]
        chat_body = {**request.passthrough(), "model": request.model, "messages": instructions + conversation,
                     "temperature": request.temperature, "top_p": request.top_p, "user": request.user,
                     "max_tokens": request.max_output_tokens, "tools": chat_tools(request.tools),
                     "parallel_tool_calls": request.parallel_tool_calls,
                     "response_format": response_format(request.text)}
        if "tool_choice" in request.model_fields_set:  # unset: chat's rule decides (auto with tools, if enabled)
            chat_body["tool_choice"] = chat_tool_choice(request.tool_choice)
        try:
            chat = ChatCompletionRequest.model_validate(chat_body)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None
        max_model_len = frontend.model_config.max_model_len
        try:
            tools = plan_tools(chat, frontend.frontend_config)
            prompt = render_chat_prompt(frontend, chat, tools.template_tools, images_endpoint="/v1/responses")
            prompt_token_ids, mm_items = await attach_chat_media(
                frontend, chat, frontend.tokenizer.encode(prompt, chat.add_special_tokens))
            prompt_token_ids = truncate_prompt(prompt_token_ids, chat.truncate_prompt_tokens, max_model_len)
            max_tokens = default_max_tokens(request.max_output_tokens, frontend.generation_defaults,
                                            max_model_len - len(prompt_token_ids))
            check_context_length(len(prompt_token_ids), max(max_tokens, 1), max_model_len, what="input")
            response_id = self._response_id(request, headers)
            choice = make_choices(frontend, request_for_engine(tools, chat), response_id, [prompt_token_ids],
                                  [max_tokens], request.output_logprobs, mm_items)[0]
            constrain_choices(tools, [choice])
        except BadRequestError as exc:
            raise responses_error(exc, request.max_output_tokens is not None) from None
        store = self.store.enabled and request.store
        response = ResponseObject(self._header(request, response_id, choice, store),
                                  status="queued" if request.background else "in_progress")
        return ResponseRun(request, response, choice, conversation, call_names, store, tools, chat.stream_interval)

    @staticmethod
    def _response_id(request: ResponsesRequest, headers: Mapping[str, str]) -> str:
        """"resp_" + the request's `request_id` (vLLM), else an X-Request-Id header, else a random id."""
        base = request.request_id or headers.get("x-request-id") or uuid.uuid4().hex
        return base if base.startswith("resp_") else f"resp_{base}"

    def _header(self, request: ResponsesRequest, response_id: str, choice: Choice, store: bool) -> dict[str, Any]:
        params = choice.engine_request.sampling_params
        return {
            "id": response_id, "object": "response", "created_at": int(time.time()),
            "model": self.frontend.model_config.served_model_name, "background": request.background,
            "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
            "max_tool_calls": request.max_tool_calls, "metadata": request.metadata or {},
            "parallel_tool_calls": request.parallel_tool_calls,
            "previous_response_id": request.previous_response_id, "prompt_cache_key": request.prompt_cache_key,
            "reasoning": request.reasoning or {"effort": None, "summary": None},
            "safety_identifier": request.safety_identifier,
            "service_tier": "default" if request.service_tier in (None, "auto") else request.service_tier,
            "store": store, "temperature": params.temperature, "text": text_format(request.text),
            "tool_choice": request.tool_choice, "tools": echo_tools(request.tools),
            "top_logprobs": request.top_logprobs or 0, "top_p": params.top_p,
            "truncation": request.truncation or "disabled", "user": request.user,
        }

    # ------------------------------------------------------------------ the event sequence

    async def _events(self, run: ResponseRun) -> AsyncIterator[dict[str, Any]]:
        response, state = run.response, run.choice.state
        yield run.event("response.created", response=response.to_dict())
        response.status = "in_progress"
        yield run.event("response.in_progress", response=response.to_dict())
        processor = run.tools.make_processor()  # None: the whole output is the message's text
        writer = OutputWriter(run)
        if processor is None:
            for event in writer.content(""):  # the message opens at once; with a parser, at its first text
                yield event
        num_top = run.request.output_logprobs if processor is None else None  # logprobs: text-only outputs
        async for delta in every_n_tokens(run_choices(self.frontend, [run.choice]), run.stream_interval):
            if processor is None:
                events = writer.content(delta.text, self._logprobs(delta.tokens, num_top))
            else:
                out = processor.feed(delta.text)
                if delta.finish_reason is not None:
                    out.merge(processor.finish())
                out = run.tools.filter_stream(out)
                events = (writer.content(out.content) if out.content else []) + writer.calls(out.tool_calls)
            for event in events:
                yield event
        incomplete = state.finish_reason == "length"
        for event in writer.close(incomplete):
            yield event
        response.usage = usage(run.choice)
        if incomplete:
            response.status, response.incomplete_details = "incomplete", {"reason": "max_output_tokens"}
        else:
            response.status, response.completed_at = "completed", int(time.time())
        if run.store and not run.request.background:
            self.store.put(StoredResponse(response, run.conversation, run.call_names, finished=True))
        yield run.event(f"response.{response.status}", response=response.to_dict())

    def _logprobs(self, records: list[TokenRecord], num_top: int | None) -> list[dict[str, Any]]:
        """output_text.logprobs entries ({token, bytes, logprob, top_logprobs}); [] unless requested."""
        if num_top is None:
            return []
        entries: list[dict[str, Any]] = chat_logprobs(self.frontend.tokenizer, records, num_top)["content"]
        return entries

    @staticmethod
    def _failure_events(run: ResponseRun, error: APIError) -> list[dict[str, Any]]:
        """A stream that fails after it started: an `error` event, then response.failed (as OpenAI sends)."""
        response = run.response
        code = "invalid_prompt" if error.status_code == 400 else "server_error"
        response.status, response.error = "failed", {"code": code, "message": error.message}
        close_items(response)
        return [run.event("error", code=code, message=error.message, param=error.param),
                run.event("response.failed", response=response.to_dict())]

    async def _collect(self, run: ResponseRun) -> dict[str, Any]:
        async for _ in self._events(run):
            pass
        return run.response.to_dict()

    async def _stream(self, run: ResponseRun) -> AsyncIterator[str]:
        try:
            async for event in self._events(run):
                yield sse(event)
        except APIError as exc:
            for event in self._failure_events(run, exc):
                yield sse(event)

    # ------------------------------------------------------------------ background responses

    async def _run_background(self, run: ResponseRun, entry: StoredResponse) -> None:
        """Generate detached from any connection; cancel() cancels this task (which aborts the engine request)."""

        def record(event: dict[str, Any]) -> None:
            if entry.events is not None:
                entry.events.append(event)
            entry.notify()

        try:
            async for event in self._events(run):
                record(event)
        except asyncio.CancelledError:
            run.response.status = "cancelled"
            close_items(run.response)
        except APIError as exc:
            for event in self._failure_events(run, exc):
                record(event)
        except Exception as exc:  # never lose a background failure silently
            logger.exception("background response %s failed", run.response.id)
            error = APIError(f"internal server error: {type(exc).__name__}")
            for event in self._failure_events(run, error):
                record(event)
        finally:
            entry.finished = True
            entry.notify()

    @staticmethod
    async def _replay(entry: StoredResponse, starting_after: int | None) -> AsyncIterator[str]:
        """A background stream's events after `starting_after`, then live ones until it finishes."""
        assert entry.events is not None
        index = 0 if starting_after is None else starting_after + 1
        while True:
            entry.changed.clear()
            while index < len(entry.events):
                yield sse(entry.events[index])
                index += 1
            if entry.finished:
                return
            await entry.changed.wait()

    # ------------------------------------------------------------------ GET / cancel / DELETE

    def _lookup(self, response_id: str) -> StoredResponse:
        if not self.store.enabled:
            raise NotFoundError(f"Response with id '{response_id}' not found: {_STORE_DISABLED}.")
        entry = self.store.get(response_id)
        if entry is None:
            raise NotFoundError(f"Response with id '{response_id}' not found.")
        return entry

    async def retrieve(self, response_id: str, stream: bool, starting_after: int | None) -> Response:
        entry = self._lookup(response_id)
        if not stream:
            return JSONResponse(entry.response.to_dict())
        if entry.events is None:
            raise BadRequestError(f"Response with id '{response_id}' cannot be streamed: only responses created "
                                  "with background=true and stream=true can", param="stream")
        return StreamingResponse(self._replay(entry, starting_after), media_type="text/event-stream")

    async def cancel(self, response_id: str) -> Response:
        entry = self._lookup(response_id)
        status = entry.response.status
        if entry.task is None:
            raise BadRequestError("Cannot cancel a synchronous response: only responses created with "
                                  "background=true can be cancelled.")
        if status == "cancelled":
            return JSONResponse(entry.response.to_dict())
        if not entry.active or status not in ACTIVE_STATUSES:
            raise BadRequestError(f"Cannot cancel a response that is already {status}.")
        entry.response.status = "cancelled"
        entry.task.cancel()
        await asyncio.gather(entry.task, return_exceptions=True)
        return JSONResponse(entry.response.to_dict())

    async def delete(self, response_id: str) -> Response:
        entry = self._lookup(response_id)
        if entry.task is not None and entry.active:
            entry.task.cancel()
            await asyncio.gather(entry.task, return_exceptions=True)
        self.store.delete(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})
