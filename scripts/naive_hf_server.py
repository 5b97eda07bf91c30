#!/usr/bin/env python3
"""The naive baseline: a minimal OpenAI-compatible server around transformers `generate()`.

    python scripts/naive_hf_server.py --model $PEERS_DIR/smollm2-hf --port 8400

It serves ONE request at a time (an asyncio lock around each generation; no batching, no paging),
which is what "just call generate() behind a web server" gives you. Endpoints:

    GET  /health, /v1/models
    POST /v1/completions   prompt (string, or a list holding one string or one list of token ids),
                           max_tokens, temperature, top_p, seed, ignore_eos, stream,
                           stream_options.include_usage

Streaming sends one SSE chunk per generated token, fed from generate()'s streamer hook; the text of
each chunk is the newly stable part of the incremental detokenization.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

if TYPE_CHECKING:
    import torch

_DONE = object()  # sentinel: generation finished (or failed) in the worker thread


@dataclass(frozen=True)
class CompletionParams:
    """The request fields the baseline honours; anything else in the body is ignored."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    ignore_eos: bool
    stream: bool
    include_usage: bool


class NaiveEngine:
    """transformers model + tokenizer; generates one request at a time (guarded by `lock`)."""

    def __init__(self, model_dir: str, num_threads: int | None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if num_threads:
            torch.set_num_threads(num_threads)
        self.model_name = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model: Any = cast(Any, AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_token_ids: list[int] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_ids[0] if self.eos_token_ids else 0
        self.lock = asyncio.Lock()

    def encode_prompt(self, prompt: Any) -> list[int]:
        """Accept a string, a list of token ids, or a one-element list of either."""
        if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise ValueError("prompt must be a string or a list of token ids (one prompt per request)")

    def generate(self, params: CompletionParams, on_token: Any) -> None:
        """Run generate() in the calling thread, calling on_token(token_id) for each new token."""
        import torch
        from transformers import GenerationConfig
        from transformers.generation.streamers import BaseStreamer

        class _TokenStreamer(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:  # generate() first "streams" the prompt itself
                    self.prompt_seen = True
                    return
                for token_id in value.reshape(-1).tolist():
                    on_token(int(token_id))

            def end(self) -> None:
                pass

        do_sample = params.temperature > 0
        config = GenerationConfig(  # type: ignore[no-untyped-call]
            max_new_tokens=params.max_tokens,
            do_sample=do_sample,
            temperature=params.temperature if do_sample else None,
            top_p=params.top_p if do_sample else None,
            top_k=None,
            # No eos id: generate() stops only at max_new_tokens (ignore_eos semantics).
            eos_token_id=None if params.ignore_eos else self.eos_token_ids,
            pad_token_id=self.pad_token_id,
        )
        if params.seed is not None:
            torch.manual_seed(params.seed)
        input_ids = torch.tensor([params.prompt_ids])  # [1, num_prompt_tokens]
        with torch.inference_mode():
            self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                generation_config=config, streamer=_TokenStreamer())


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back an incomplete UTF-8 tail."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.emitted_text = ""

    def add(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is split across tokens
            return ""
        delta = text[len(self.emitted_text):] if text.startswith(self.emitted_text) else ""
        self.emitted_text = text
        return delta


def parse_request(engine: NaiveEngine, body: dict[str, Any]) -> CompletionParams:
    stream_options = body.get("stream_options") or {}
    max_tokens = body.get("max_tokens")
    return CompletionParams(
        prompt_ids=engine.encode_prompt(body.get("prompt", "")),
        max_tokens=16 if max_tokens is None else int(max_tokens),
        temperature=1.0 if body.get("temperature") is None else float(body["temperature"]),
        top_p=float(body.get("top_p") or 1.0),
        seed=body.get("seed"),
        ignore_eos=bool(body.get("ignore_eos", False)),
        stream=bool(body.get("stream", False)),
        include_usage=bool(stream_options.get("include_usage", False)),
    )


async def run_generation(engine: NaiveEngine, params: CompletionParams) -> AsyncIterator[int]:
    """Yield generated token ids as the worker thread produces them; one generation at a time."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            engine.generate(params, lambda token_id: loop.call_soon_threadsafe(queue.put_nowait, token_id))
        except BaseException as exc:  # reported to the request below, the server keeps serving
            errors.append(exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    async with engine.lock:
        threading.Thread(target=worker, daemon=True).start()
        while (item := await queue.get()) is not _DONE:
            assert isinstance(item, int)
            yield item
    if errors:
        raise errors[0]


def _usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


def _finish_reason(engine: NaiveEngine, params: CompletionParams, token_ids: list[int]) -> str:
    stopped_on_eos = bool(token_ids) and not params.ignore_eos and token_ids[-1] in engine.eos_token_ids
    return "stop" if stopped_on_eos else "length"


def _chunk(request_id: str, model: str, created: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


async def stream_completion(engine: NaiveEngine, params: CompletionParams) -> AsyncIterator[str]:
    request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    detokenizer = IncrementalDetokenizer(engine.tokenizer)
    try:
        async for token_id in run_generation(engine, params):
            delta = detokenizer.add(token_id)
            yield f"data: {json.dumps(_chunk(request_id, engine.model_name, created, delta, None))}\n\n"
    except Exception as exc:
        yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n"
        yield "data: [DONE]\n\n"
        return
    final = _chunk(request_id, engine.model_name, created, "",
                   _finish_reason(engine, params, detokenizer.token_ids))
    yield f"data: {json.dumps(final)}\n\n"
    if params.include_usage:
        usage_chunk = {**_chunk(request_id, engine.model_name, created, "", None), "choices": [],
                       "usage": _usage(len(params.prompt_ids), len(detokenizer.token_ids))}
        yield f"data: {json.dumps(usage_chunk)}\n\n"
    yield "data: [DONE]\n\n"


async def complete(engine: NaiveEngine, params: CompletionParams) -> dict[str, Any]:
    token_ids = [token_id async for token_id in run_generation(engine, params)]
    text = str(engine.tokenizer.decode(token_ids, skip_special_tokens=True))
    body = _chunk(f"cmpl-{uuid.uuid4().hex}", engine.model_name, int(time.time()), text,
                  _finish_reason(engine, params, token_ids))
    body["usage"] = _usage(len(params.prompt_ids), len(token_ids))
    return body


def create_app(engine: NaiveEngine) -> FastAPI:
    app = FastAPI(title="naive transformers baseline")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model",
                                            "created": 0, "owned_by": "naive_hf_server"}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        try:
            params = parse_request(engine, await request.json())
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": {"message": str(exc), "type": "invalid_request_error"}},
                                status_code=400)
        if params.stream:
            return StreamingResponse(stream_completion(engine, params), media_type="text/event-stream")
        try:
            return JSONResponse(await complete(engine, params))
        except Exception as exc:
            return JSONResponse({"error": {"message": str(exc), "type": "server_error"}}, status_code=500)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8400)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice, i.e. OMP_NUM_THREADS)")
    args = parser.parse_args()

    import uvicorn

    engine = NaiveEngine(args.model, args.threads)
    uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
