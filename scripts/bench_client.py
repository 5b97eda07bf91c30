"""The HTTP side of `scripts/bench_serving.py`: the targets, one streamed completion timed chunk by chunk, and
the per-target probing (served model name, whether ignore_eos is accepted) and warm-up.

A module, not a script: `python scripts/bench_serving.py --help` shows how to run the benchmark.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass(frozen=True)
class Target:
    name: str
    base_url: str  # without the trailing /v1


@dataclass(frozen=True)
class PromptSpec:
    prompt: str
    num_prompt_tokens: int  # by the benchmark's tokenizer; 0 when unknown (dataset without tokenizer)
    max_tokens: int


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    num_output_tokens: int = 0
    num_prompt_tokens: int = 0
    chunk_gaps_s: list[float] = field(default_factory=list)  # between consecutive content chunks


@dataclass
class TargetSession:
    """Per-target state found by probing: the model name to send and whether ignore_eos is accepted."""

    target: Target
    model: str
    ignore_eos: bool


# ----------------------------------------------------------------------------- one request


def request_body(session: TargetSession, spec: PromptSpec, temperature: float) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": session.model, "prompt": spec.prompt, "max_tokens": spec.max_tokens,
        "temperature": temperature, "stream": True, "stream_options": {"include_usage": True},
    }
    if session.ignore_eos:
        body["ignore_eos"] = True
    return body


def _is_token_chunk(choice: dict[str, Any]) -> bool:
    """A chunk that carries a generated token: text, or empty text (a held-back partial character)
    before the finish; an empty chunk that only carries finish_reason is not a token."""
    return bool(choice.get("text")) or ("text" in choice and choice.get("finish_reason") is None)


class _StreamFailed(Exception):
    """A request failed; `retryable` when the server dropped the connection before answering."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message[:300])
        self.retryable = retryable


async def send_request(client: httpx.AsyncClient, session: TargetSession, spec: PromptSpec,
                       temperature: float) -> RequestResult:
    """Stream one completion and time it; failures are recorded, never raised.

    A connection the server closed before sending any response (a keep-alive race) is retried once,
    with the clock restarted."""
    for attempt in range(2):
        result = RequestResult(num_prompt_tokens=spec.num_prompt_tokens)
        try:
            await _stream_completion(client, session, spec, temperature, result)
            return result
        except _StreamFailed as exc:
            result.error = str(exc)
            if not exc.retryable or attempt == 1:
                return result
    raise AssertionError("unreachable")


async def _stream_completion(client: httpx.AsyncClient, session: TargetSession, spec: PromptSpec,
                             temperature: float, result: RequestResult) -> None:
    """Send one streaming request and fill `result`; raises _StreamFailed."""
    url = f"{session.target.base_url}/v1/completions"
    start = last = time.perf_counter()
    num_token_chunks, usage, answered = 0, None, False
    try:
        async with client.stream("POST", url, json=request_body(session, spec, temperature)) as response:
            answered = True
            if response.status_code != 200:
                raise _StreamFailed(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                payload = line[len("data:"):].strip() if line.startswith("data:") else ""
                if not payload or payload == "[DONE]":
                    continue
                chunk = json.loads(payload)
                if "error" in chunk:
                    raise _StreamFailed(f"error chunk: {chunk['error']}")
                usage = chunk.get("usage") or usage
                if any(_is_token_chunk(choice) for choice in chunk.get("choices") or []):
                    now = time.perf_counter()
                    if num_token_chunks == 0:
                        result.ttft_s = now - start
                    else:
                        result.chunk_gaps_s.append(now - last)
                    last, num_token_chunks = now, num_token_chunks + 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        retryable = not answered and isinstance(exc, (httpx.RemoteProtocolError, httpx.ConnectError))
        raise _StreamFailed(f"{type(exc).__name__}: {exc}", retryable) from exc
    if num_token_chunks == 0:
        raise _StreamFailed("no token chunks in the stream")
    result.e2e_s = time.perf_counter() - start
    result.num_output_tokens = int(usage["completion_tokens"]) if usage else num_token_chunks
    if usage and usage.get("prompt_tokens"):
        result.num_prompt_tokens = int(usage["prompt_tokens"])
    result.ok = True


# ----------------------------------------------------------------------------- targets


async def open_session(client: httpx.AsyncClient, target: Target, model: str | None,
                       ignore_eos: str) -> TargetSession:
    """Find the served model name (unless given) and whether the server accepts ignore_eos."""
    if model is None:
        response = await client.get(f"{target.base_url}/v1/models")
        response.raise_for_status()
        model = str(response.json()["data"][0]["id"])
    accepts = ignore_eos == "on"
    if ignore_eos == "auto":
        probe = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0, "ignore_eos": True}
        accepts = (await client.post(f"{target.base_url}/v1/completions", json=probe)).status_code == 200
    return TargetSession(target, model, accepts)


async def warm_up(client: httpx.AsyncClient, session: TargetSession, spec: PromptSpec, temperature: float) -> None:
    short = PromptSpec(spec.prompt, spec.num_prompt_tokens, max(2, min(spec.max_tokens, 16)))
    result = await send_request(client, session, short, temperature)
    if not result.ok:
        raise SystemExit(f"warm-up request to {session.target.name} failed: {result.error}")


if __name__ == "__main__":  # a module of scripts/bench_serving.py: --help prints the docstring above
    from bench_levels import module_main

    module_main(__doc__)
