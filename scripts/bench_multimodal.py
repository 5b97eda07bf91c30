"""Multimodal mode of `scripts/bench_serving.py`: streamed chat completions with one image each, side by side.

    python scripts/bench_serving.py --mode multimodal \\
        --target conveyor=http://127.0.0.1:8100 --target vllm=http://127.0.0.1:8200 \\
        --in-process .models/smollm2_llava --output-len 32 --concurrency 1 4 16

Workload: per concurrency level `--num-prompts` requests (default max(8, 2 x concurrency)), each one user message
of an image part then a short question (cycled from QUESTIONS); the image is a PNG of random pixels,
`--image-size` square, a different one for every request (so neither the encoder cache nor the prefix cache can
answer it), sent inline as a data: URL; `--same-image` sends one image with every request instead, to measure
those caches. Greedy, `max_tokens = --output-len` with ignore_eos (when the server accepts it), streaming with
usage. The same requests go to every target; levels and the rotation of targets are bench_serving.py's.

`--in-process DIR` adds transformers' `generate()` on the same Hugging Face folder (AutoModelForImageTextToText:
LLaVA, Qwen2-VL) in the benchmark process: the requests of a level in batches of `concurrency` (left-padded),
greedy, `max_new_tokens = min_new_tokens = --output-len`; a batch's time counts PNG decoding and the processor
too, as a server's does. Its TTFT is the batch's first generated token (every request of a batch shares it).

Columns are bench_serving.py's: requests/s, output tok/s, TTFT, TPOT = (e2e - TTFT) / (output tokens - 1), ITL
(gaps between streamed content chunks; the in-process baseline's decode steps).
"""
from __future__ import annotations

import argparse
import io
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from bench_client import RequestResult, Target, TargetSession

QUESTIONS = ["What is in this image?", "Describe the picture in one sentence.", "What colours do you see?",
             "Is there a person in this image?"]


@dataclass(frozen=True)
class ChatSpec:
    """One request: an image (PNG bytes) and a question; the token count is filled from the server's usage."""

    image_png: bytes
    question: str
    max_tokens: int
    num_prompt_tokens: int = 0

    def messages(self) -> list[dict[str, Any]]:
        import base64

        url = "data:image/png;base64," + base64.b64encode(self.image_png).decode("ascii")
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": self.question}]}]


def random_png(rng: random.Random, size: int) -> bytes:
    """A `size` x `size` RGB PNG of uniform random pixels (incompressible: ~3 bytes a pixel)."""
    from PIL import Image

    pixels = rng.randbytes(size * size * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def multimodal_workload(num_prompts: int, image_size: int, output_len: int, seed: int,
                        same_image: bool) -> list[ChatSpec]:
    rng = random.Random(seed)
    shared = random_png(rng, image_size) if same_image else b""
    return [ChatSpec(shared or random_png(rng, image_size), QUESTIONS[i % len(QUESTIONS)], output_len)
            for i in range(num_prompts)]


def multimodal_parts(args: argparse.Namespace) -> tuple[dict[int, list[ChatSpec]], Any,
                                                         tuple[TargetSession, Batcher] | None]:
    """For bench_serving.run_benchmark: each level's requests, their sender and the transformers baseline
    (`--in-process`), named as a target."""
    workloads = {c: multimodal_workload(args.num_prompts or max(8, 2 * c), args.image_size, args.output_len,
                                        args.seed + c, args.same_image) for c in args.concurrency}
    if not args.in_process:
        return workloads, send_chat, None
    session = TargetSession(Target("transformers-generate", "in-process"), args.in_process, True)
    return workloads, send_chat, (session, in_process_generator(args.in_process))


# ----------------------------------------------------------------------------- one streamed chat request


class _ChatFailed(Exception):
    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message[:300])
        self.retryable = retryable


async def send_chat(client: httpx.AsyncClient, session: TargetSession, spec: ChatSpec,
                    temperature: float) -> RequestResult:
    """Stream one chat completion and time it (bench_client.send_request's contract, on /v1/chat/completions):
    failures are recorded, never raised; a connection closed before any answer is retried once."""
    for attempt in range(2):
        result = RequestResult()
        try:
            await _stream_chat(client, session, spec, temperature, result)
            return result
        except _ChatFailed as exc:
            result.error = str(exc)
            if not exc.retryable or attempt == 1:
                return result
    raise AssertionError("unreachable")


async def _stream_chat(client: httpx.AsyncClient, session: TargetSession, spec: ChatSpec, temperature: float,
                       result: RequestResult) -> None:
    body: dict[str, Any] = {"model": session.model, "messages": spec.messages(), "max_tokens": spec.max_tokens,
                            "temperature": temperature, "stream": True, "stream_options": {"include_usage": True}}
    if session.ignore_eos:
        body["ignore_eos"] = True
    start = last = time.perf_counter()
    num_chunks, usage, answered = 0, None, False
    try:
        async with client.stream("POST", f"{session.target.base_url}/v1/chat/completions", json=body) as response:
            answered = True
            if response.status_code != 200:
                raise _ChatFailed(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                payload = line[len("data:"):].strip() if line.startswith("data:") else ""
                if not payload or payload == "[DONE]":
                    continue
                chunk = json.loads(payload)
                if "error" in chunk:
                    raise _ChatFailed(f"error chunk: {chunk['error']}")
                usage = chunk.get("usage") or usage
                # The role chunk (empty content) comes before the prefill on some servers: only text counts.
                if any((choice.get("delta") or {}).get("content") for choice in chunk.get("choices") or []):
                    now = time.perf_counter()
                    if num_chunks == 0:
                        result.ttft_s = now - start
                    else:
                        result.chunk_gaps_s.append(now - last)
                    last, num_chunks = now, num_chunks + 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        retryable = not answered and isinstance(exc, (httpx.RemoteProtocolError, httpx.ConnectError))
        raise _ChatFailed(f"{type(exc).__name__}: {exc}", retryable) from exc
    if num_chunks == 0:
        raise _ChatFailed("no content chunks in the stream")
    result.e2e_s = time.perf_counter() - start
    result.num_output_tokens = int(usage["completion_tokens"]) if usage else num_chunks
    result.num_prompt_tokens = int(usage.get("prompt_tokens") or 0) if usage else 0
    result.ok = True


# ----------------------------------------------------------------------------- transformers generate()

Batcher = Callable[[list[ChatSpec], int, Callable[[int], None]], tuple[list[RequestResult], float]]


def in_process_generator(model_dir: str) -> Batcher:
    """transformers' generate() on `model_dir`, as a function that runs a level's specs in batches of
    `concurrency`, calls `on_done(n)` after each batch and answers (results, duration_s)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor: Any = AutoProcessor.from_pretrained(model_dir)  # type: ignore[no-untyped-call]
    processor.tokenizer.padding_side = "left"  # decoder-only batches pad on the left
    model: Any = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    pad_token_id = processor.tokenizer.pad_token_id
    if pad_token_id is None:
        pad_token_id = processor.tokenizer.eos_token_id

    @torch.inference_mode()
    def generate(batch: list[ChatSpec]) -> list[RequestResult]:
        from PIL import Image

        start = time.perf_counter()
        images = [Image.open(io.BytesIO(spec.image_png)).convert("RGB") for spec in batch]
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": spec.question}]}],
            add_generation_prompt=True, tokenize=False) for spec in batch]
        inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
        step_times = _StepClock()
        max_new = max(spec.max_tokens for spec in batch)
        output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new,
                                pad_token_id=pad_token_id, streamer=step_times)
        end = time.perf_counter()
        num_new = int(output.shape[1] - inputs["input_ids"].shape[1])
        first = step_times.times[0] if step_times.times else end
        gaps = [b - a for a, b in zip(step_times.times, step_times.times[1:])]
        prompt_lens = inputs["attention_mask"].sum(dim=1).tolist()
        return [RequestResult(ok=True, ttft_s=first - start, e2e_s=end - start, num_output_tokens=num_new,
                              num_prompt_tokens=int(n), chunk_gaps_s=gaps) for n in prompt_lens]

    def run(specs: list[ChatSpec], concurrency: int, on_done: Callable[[int], None]) -> tuple[list[RequestResult],
                                                                                             float]:
        results: list[RequestResult] = []
        started = time.perf_counter()
        for i in range(0, len(specs), concurrency):
            batch = specs[i:i + concurrency]
            results.extend(generate(batch))
            on_done(len(batch))
        return results, time.perf_counter() - started

    return run


class _StepClock:
    """A generate() streamer that only notes when each decode step's tokens arrive (the first put() is the
    prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value: Any) -> None:
        if self._seen_prompt:
            self.times.append(time.perf_counter())
        self._seen_prompt = True

    def end(self) -> None:
        pass


if __name__ == "__main__":  # a module of scripts/bench_serving.py: --help prints the docstring above
    from bench_levels import module_main

    module_main(__doc__)
