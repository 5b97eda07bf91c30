"""POST /v1/audio/transcriptions and /v1/audio/translations: read the upload (size-limited) -> decode and resample
-> split into <= 30 s windows -> one engine request per window, all submitted at once -> join the texts in order
(or stream them as SSE deltas, window by window). srt, vtt and verbose_json decode with timestamps (the prompt
without <|notimestamps|>) and cut each window's output into timed segments; json and text decode without them.

Engine request `i` of an API request with id `ID` is `ID-i` (window i); `ID-lang` detects the language of a
multilingual model's first window when the request names none.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator

from fastapi.responses import Response, StreamingResponse
from starlette.requests import Request

from engine_core.protocol import EngineCoreRequest, SamplingParams
from frontend.detokenizer import ChoiceDelta, ChoiceState, IncrementalDetokenizer
from frontend.errors import APIError, BadRequestError, error_event
from frontend.generate.choices import Choice, run_choices
from frontend.speech.audio import AudioWindow, audio_input, decode_audio, duration_s, split_windows
from frontend.speech.formats import WindowResult, speech_response, timed_window
from frontend.speech.protocol import SpeechRequest
from frontend.speech.upload import read_form
from frontend.speech.whisper import WhisperVocab
from frontend.state import FrontendState
from frontend.streaming import SSE_DONE, ClientDisconnected, sse_event, unless_disconnected

ENDPOINTS = {"transcribe": "/v1/audio/transcriptions", "translate": "/v1/audio/translations"}
TIMED_FORMATS = ("srt", "vtt", "verbose_json")  # segment timestamps: decoded with Whisper's timestamp tokens


def speech_sampling_params(frontend: FrontendState, request: SpeechRequest | None, num_prompt_tokens: int,
                           logprobs: int | None = None) -> SamplingParams:
    """Greedy by default (temperature 0, as vLLM's speech endpoints); `max_completion_tokens` caps what the
    decoder's context leaves."""
    room = frontend.model_config.max_model_len - num_prompt_tokens
    if room < 1:
        raise BadRequestError(f"the decoder prompt ({num_prompt_tokens} tokens) leaves no room in the model's "
                              f"context of {frontend.model_config.max_model_len} tokens", param="prompt")
    if request is None:
        return SamplingParams(max_tokens=room, temperature=0.0)
    return SamplingParams(
        max_tokens=min(room, request.max_completion_tokens or room), temperature=request.temperature,
        top_p=request.top_p or 1.0, top_k=max(0, request.top_k or 0), min_p=request.min_p or 0.0,
        presence_penalty=request.presence_penalty or 0.0, frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=request.repetition_penalty or 1.0, seed=request.seed, logprobs=logprobs)


def window_choices(frontend: FrontendState, vocab: WhisperVocab, request_id: str, windows: list[AudioWindow],
                   prompt_token_ids: list[int], params: SamplingParams, priority: int = 0,
                   first_index: int = 0) -> list[Choice]:
    """One engine request per window (ids `request_id-i`), each with its own detokenizer."""
    arrival_time = time.time()
    choices = []
    for offset, window in enumerate(windows):
        index = first_index + offset
        engine_request = EngineCoreRequest(
            request_id=f"{request_id}-{index}", prompt_token_ids=prompt_token_ids, sampling_params=params,
            eos_token_id=vocab.end_of_text, arrival_time=arrival_time, priority=priority,
            client_index=frontend.engine.client_index, audio=audio_input(window.samples))
        state = ChoiceState(index=offset, request_id=engine_request.request_id, prompt_index=offset,
                            detokenizer=IncrementalDetokenizer(frontend.tokenizer, prompt_token_ids, True))
        choices.append(Choice(engine_request, state, prompt_token_ids))
    return choices


async def detect_language(frontend: FrontendState, vocab: WhisperVocab, request_id: str,
                          window: AudioWindow) -> str:
    """A multilingual model's most likely language for `window`: one greedy step over the language tokens."""
    params = SamplingParams(max_tokens=1, temperature=0.0, allowed_token_ids=sorted(vocab.language_ids.values()))
    prompt = vocab.language_detection_prompt()
    [choice] = window_choices(frontend, vocab, f"{request_id}-lang", [window], prompt, params)
    async for _ in run_choices(frontend, [choice]):
        pass
    detected = next((vocab.language_of_token(token) for token in choice.state.token_ids), None)
    return detected or "en"


async def in_window_order(deltas: AsyncIterator[ChoiceDelta], num_windows: int) -> AsyncIterator[ChoiceDelta]:
    """Deltas of concurrently decoded windows, re-ordered so window i's text all comes before window i+1's."""
    held: list[list[ChoiceDelta]] = [[] for _ in range(num_windows)]
    current = 0
    async for delta in deltas:
        held[delta.index].append(delta)
        while current < num_windows and held[current]:
            ready = held[current].pop(0)
            yield ready
            if ready.finish_reason is not None:
                current += 1


class SpeechServing:
    """Transcriptions and translations; `task` is "transcribe" or "translate"."""

    def __init__(self, frontend: FrontendState) -> None:
        self.frontend = frontend

    async def create(self, raw_request: Request, task: str) -> Response:
        frontend = self.frontend
        endpoint = ENDPOINTS[task]
        form = await read_form(raw_request)  # first: an error answer must not leave the body unread
        request = SpeechRequest.from_form(form)
        frontend.check_model(request.model)
        vocab = frontend.require_speech(endpoint)
        if task == "translate" and not vocab.multilingual:
            raise BadRequestError("this model is English-only and cannot translate: use /v1/audio/transcriptions, "
                                  "or serve a multilingual Whisper model", param="model")
        language = vocab.language_code(request.language)
        frontend.check_engine_alive()
        assert form.file is not None
        samples = await asyncio.to_thread(decode_audio, form.file)
        windows = split_windows(samples)
        prefix = "trsc" if task == "transcribe" else "trsl"
        request_id = f"{prefix}-{request.request_id or raw_request.headers.get('x-request-id') or uuid.uuid4().hex}"
        if language is None:
            language = await detect_language(frontend, vocab, request_id, windows[0])
        previous = vocab.previous_text_ids(frontend.tokenizer, request.prompt,
                                           frontend.model_config.max_model_len // 2 - 1)
        timestamps = request.response_format in TIMED_FORMATS
        prompt = vocab.decoder_prompt(task, language, previous, timestamps=timestamps)
        verbose = request.response_format == "verbose_json"
        params = speech_sampling_params(frontend, request, len(prompt), logprobs=0 if verbose else None)
        choices = window_choices(frontend, vocab, request_id, windows, prompt, params, request.priority)
        if request.stream:
            return StreamingResponse(self._stream(request, request_id, task, choices), media_type="text/event-stream")
        try:
            results = await unless_disconnected(
                raw_request, self._collect(choices, windows, vocab.timestamp_begin if timestamps else None))
        except ClientDisconnected:
            return Response(status_code=499)
        return speech_response(request.response_format, task, language, duration_s(samples), results,
                               request.temperature)

    async def _collect(self, choices: list[Choice], windows: list[AudioWindow],
                       timestamp_begin: int | None = None) -> list[WindowResult]:
        """Each window's result; with `timestamp_begin` (decoded with timestamps) its timed segments too."""
        logprobs: list[list[float]] = [[] for _ in choices]
        async for delta in run_choices(self.frontend, choices):
            logprobs[delta.index].extend(record.logprobs.logprob for record in delta.tokens
                                         if record.logprobs is not None)
        eot = self.frontend.speech.end_of_text if self.frontend.speech is not None else -1
        results = []
        for index, (choice, window) in enumerate(zip(choices, windows)):
            token_ids = [t for t in choice.state.token_ids if t != eot]
            result = WindowResult(window, choice.state.text, token_ids, logprobs[index], choice.state.finish_reason,
                                  len(choice.prompt_token_ids))
            if timestamp_begin is not None:
                result.text, result.timed_segments = timed_window(window, token_ids, timestamp_begin,
                                                                  self.frontend.tokenizer.decode)
            results.append(result)
        return results

    async def _stream(self, request: SpeechRequest, request_id: str, task: str,
                      choices: list[Choice]) -> AsyncIterator[str]:
        """vLLM's shape: `transcription.chunk` / `translation.chunk` objects with `choices[0].delta.content`; the
        finish reason on the last window's last chunk; a usage chunk with stream_include_usage; then [DONE]."""
        header = {"id": request_id, "object": "transcription.chunk" if task == "transcribe" else "translation.chunk",
                  "created": int(time.time()), "model": self.frontend.model_config.served_model_name}
        last_index = len(choices) - 1
        started = False  # text sent yet: the very first delta loses Whisper's leading space
        try:
            async for delta in in_window_order(run_choices(self.frontend, choices), len(choices)):
                text = delta.text if started else delta.text.lstrip()
                started = started or bool(text)
                finished = delta.index == last_index and delta.finish_reason is not None
                if not text and not finished:
                    continue
                choice: dict[str, Any] = {"delta": {"content": text}}
                if finished:
                    choice.update(finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)
                chunk: dict[str, Any] = {**header, "choices": [choice]}
                if request.stream_continuous_usage_stats:
                    chunk["usage"] = _token_usage(choices)
                yield sse_event(chunk)
            if request.stream_include_usage:
                yield sse_event({**header, "choices": [], "usage": _token_usage(choices)})
        except APIError as exc:
            yield error_event(exc)
        yield SSE_DONE


def _token_usage(choices: list[Choice]) -> dict[str, int]:
    prompt_tokens = sum(len(choice.prompt_token_ids) for choice in choices)
    completion_tokens = sum(len(choice.state.token_ids) for choice in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
