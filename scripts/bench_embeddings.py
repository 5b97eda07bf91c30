"""Embeddings mode of `scripts/bench_serving.py`: sentences/s on /v1/embeddings, side by side in one run.

    python scripts/bench_serving.py --mode embeddings \\
        --target conveyor=http://127.0.0.1:8100 --target vllm=http://127.0.0.1:8200 \\
        --in-process MODEL_DIR --concurrency 1 16 64 --num-sentences 512

Workload: `--num-sentences` deterministic English sentences of 6..30 words (seeded), the same for every target.
Each request embeds ONE sentence (`input` a string, encoding_format float), so the server's own batching across
concurrent requests is what is measured; `concurrency` requests are in flight at any time. Levels run in order;
within a level the targets run one after another, order rotated per level, so machine noise is shared fairly.

`--in-process DIR` adds a baseline without HTTP: sentence-transformers' `SentenceTransformer(DIR).encode()` with
batch_size = the concurrency level (or, if sentence-transformers is not installed, transformers AutoModel + mean
pooling + normalize, labelled so). Per level and target: sentences/s, request latency mean/p50/p99 (ms).
"""
from __future__ import annotations

import asyncio
import random
import time
from typing import Any, Callable

import aiohttp
from bench_levels import (HttpTarget, Runner, format_levels_table, http_runners, http_session, latency_stats,
                          post_checked, run_interleaved, send_all, warm_up)

_WORDS = ("the a man woman child dog cat bird car train city river mountain house garden kitchen table book "
          "letter music song film game team player doctor teacher student market price water coffee bread food "
          "eats reads writes plays sings walks runs drives builds opens closes finds loses buys sells watches "
          "quickly slowly quietly happily early late today yesterday tomorrow near far under over inside "
          "outside with without before after because while red blue green small large old new bright dark "
          "warm cold busy empty famous local").split()


def make_sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 30))]
        sentences.append(" ".join(words).capitalize() + ".")
    return sentences


async def run_http_level(client: aiohttp.ClientSession, target: HttpTarget, model: str,
                         sentences: list[str], concurrency: int) -> dict[str, Any]:
    async def send(sentence: str) -> str | None:
        return await post_checked(client.post(f"{target.base_url}/v1/embeddings", json={
            "model": model, "input": sentence, "encoding_format": "float"}), b'"embedding"')

    run = await send_all(sentences, concurrency, send)
    return _summary(target.name, concurrency, len(run.latencies), run.duration_s, run.latencies, run.errors)


def in_process_encoder(model_dir: str) -> tuple[str, Callable[[list[str], int], Any]]:
    """(label, encode(sentences, batch_size)) for the in-process baseline."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return "transformers-mean-pool", _transformers_encoder(model_dir)
    model = SentenceTransformer(model_dir, device="cpu")
    return "sentence-transformers", lambda batch, batch_size: model.encode(
        batch, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True)


def _transformers_encoder(model_dir: str) -> Callable[[list[str], int], Any]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()

    @torch.inference_mode()
    def encode(batch: list[str], batch_size: int) -> Any:
        out = []
        for i in range(0, len(batch), batch_size):
            inputs = tokenizer(batch[i:i + batch_size], padding=True, truncation=True, return_tensors="pt")
            hidden = model(**inputs).last_hidden_state  # [B, L, H]
            mask = inputs["attention_mask"].unsqueeze(-1).float()  # [B, L, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1)  # [B, H]
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out)

    return encode


def run_in_process_level(label: str, encode: Callable[[list[str], int], Any], sentences: list[str],
                         concurrency: int) -> dict[str, Any]:
    """One encode() call over all sentences with batch_size = concurrency; per-batch time as the latency."""
    latencies = []
    started = time.perf_counter()
    for i in range(0, len(sentences), concurrency):
        batch_started = time.perf_counter()
        encode(sentences[i:i + concurrency], concurrency)
        latencies.extend([time.perf_counter() - batch_started] * len(sentences[i:i + concurrency]))
    return _summary(label, concurrency, len(sentences), time.perf_counter() - started, latencies, [])


def _summary(name: str, concurrency: int, completed: int, duration_s: float, latencies: list[float],
             errors: list[str]) -> dict[str, Any]:
    return {"target": name, "concurrency": concurrency, "completed": completed, "failed": len(errors),
            "errors": errors[:3], "duration_s": duration_s,
            "sentences_per_s": completed / duration_s if duration_s > 0 else 0.0, **latency_stats(latencies)}


async def run_embeddings_benchmark(targets: list[HttpTarget], concurrency_levels: list[int],
                                   num_sentences: int, seed: int, in_process_dir: str | None,
                                   warmup: bool = True, timeout_s: float = 600.0) -> list[dict[str, Any]]:
    sentences = make_sentences(num_sentences, seed)
    encoder = in_process_encoder(in_process_dir) if in_process_dir else None
    async with http_session(targets, concurrency_levels, timeout_s) as (client, models):
        if warmup:
            await warm_up(client, targets, models, run_http_level, sentences[:8], 4)
            if encoder is not None:
                encoder[1](sentences[:8], 8)

        def runners_for(concurrency: int) -> list[Runner]:
            runners = http_runners(client, targets, models, run_http_level, sentences, concurrency)
            if encoder is not None:
                runners.append(lambda: asyncio.to_thread(run_in_process_level, encoder[0], encoder[1], sentences,
                                                         concurrency))
            return runners

        results = await run_interleaved(concurrency_levels, runners_for,
                                        lambda result: f"{result['sentences_per_s']:.1f} sentences/s")
    return results


def format_embeddings_table(results: list[dict[str, Any]]) -> str:
    return format_levels_table(results, [("sentences/s", "sentences_per_s")])


if __name__ == "__main__":  # a module of scripts/bench_serving.py: --help prints the docstring above
    from bench_levels import module_main

    module_main(__doc__)
