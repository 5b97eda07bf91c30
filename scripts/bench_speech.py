"""Transcriptions mode of `scripts/bench_serving.py`: real-time factor on /v1/audio/transcriptions, side by side.

    python scripts/bench_serving.py --mode transcriptions \\
        --target conveyor=http://127.0.0.1:8100 --target vllm=http://127.0.0.1:8200 \\
        --audio tests/data/audio/*.wav --in-process HF_WHISPER_DIR --concurrency 1 8 --num-requests 32

Workload: `--num-requests` uploads cycling through the `--audio` clips (the same for every target), greedy
(temperature 0), English, response_format json; `concurrency` uploads in flight at any time. Levels run in order;
within a level the targets run one after another, order rotated per level.

`--in-process DIR` adds transformers' `WhisperForConditionalGeneration.generate()` on a Hugging Face Whisper
folder (scripts/convert_ctranslate2_whisper.py makes one from a CTranslate2 folder) with batch size = the
concurrency level. Per level and target: real-time factor (audio seconds transcribed per wall second, higher is
faster), requests/s, latency mean/p50/p99 (ms).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import aiohttp
from bench_levels import (HttpTarget, Runner, format_levels_table, http_runners, http_session, latency_stats,
                          post_checked, run_interleaved, send_all, warm_up)


@dataclass(frozen=True)
class Clip:
    name: str
    data: bytes  # the file as uploaded
    seconds: float
    samples_16k: Any  # float32 numpy array at 16 kHz mono, for the in-process baseline


def load_clips(paths: list[str]) -> list[Clip]:
    import numpy as np
    import soundfile
    import soxr

    clips = []
    for path in paths:
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
        mono = samples.mean(axis=1)
        clips.append(Clip(Path(path).name, Path(path).read_bytes(), len(mono) / rate,
                          np.asarray(soxr.resample(mono, rate, 16000), dtype=np.float32)))
    return clips


async def run_http_level(client: aiohttp.ClientSession, target: HttpTarget, model: str,
                         workload: list[Clip], concurrency: int) -> dict[str, Any]:
    async def send(clip: Clip) -> str | None:
        form = aiohttp.FormData()
        form.add_field("file", clip.data, filename=clip.name)
        for key, value in (("model", model), ("language", "en"), ("temperature", "0"), ("response_format", "json")):
            form.add_field(key, value)
        return await post_checked(client.post(f"{target.base_url}/v1/audio/transcriptions", data=form), b'"text"')

    run = await send_all(workload, concurrency, send)
    audio_seconds = sum(clip.seconds for clip in run.answered)
    return _summary(target.name, concurrency, audio_seconds, run.duration_s, run.latencies, run.errors)


def in_process_transcriber(model_dir: str) -> Callable[[list[Clip]], list[str]]:
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(model_dir)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    multilingual = bool(getattr(model.generation_config, "is_multilingual", False))

    @torch.inference_mode()
    def transcribe(batch: list[Clip]) -> list[str]:
        features = processor([clip.samples_16k for clip in batch], sampling_rate=16000,
                             return_tensors="pt").input_features
        kwargs: dict[str, Any] = {"language": "en", "task": "transcribe"} if multilingual else {}
        tokens = model.generate(features, do_sample=False, **kwargs)
        return [str(text) for text in processor.batch_decode(tokens, skip_special_tokens=True)]

    return transcribe


def run_in_process_level(transcribe: Callable[[list[Clip]], list[str]], workload: list[Clip],
                         concurrency: int) -> dict[str, Any]:
    latencies = []
    started = time.perf_counter()
    for i in range(0, len(workload), concurrency):
        batch = workload[i:i + concurrency]
        batch_started = time.perf_counter()
        transcribe(batch)
        latencies.extend([time.perf_counter() - batch_started] * len(batch))
    return _summary("transformers-generate", concurrency, sum(clip.seconds for clip in workload),
                    time.perf_counter() - started, latencies, [])


def _summary(name: str, concurrency: int, audio_seconds: float, duration_s: float, latencies: list[float],
             errors: list[str]) -> dict[str, Any]:
    return {"target": name, "concurrency": concurrency, "completed": len(latencies), "failed": len(errors),
            "errors": errors[:3], "duration_s": duration_s, "audio_seconds": audio_seconds,
            "real_time_factor": audio_seconds / duration_s if duration_s > 0 else 0.0,
            "requests_per_s": len(latencies) / duration_s if duration_s > 0 else 0.0, **latency_stats(latencies)}


async def run_speech_benchmark(targets: list[HttpTarget], audio_paths: list[str], concurrency_levels: list[int],
                               num_requests: int, in_process_dir: str | None, warmup: bool = True,
                               timeout_s: float = 600.0) -> list[dict[str, Any]]:
    clips = load_clips(audio_paths)
    workload = [clips[i % len(clips)] for i in range(num_requests)]
    transcribe = in_process_transcriber(in_process_dir) if in_process_dir else None
    async with http_session(targets, concurrency_levels, timeout_s) as (client, models):
        if warmup:
            await warm_up(client, targets, models, run_http_level, clips[:2], 2)
            if transcribe is not None:
                transcribe(clips[:1])

        def runners_for(concurrency: int) -> list[Runner]:
            runners = http_runners(client, targets, models, run_http_level, workload, concurrency)
            if transcribe is not None:
                runners.append(lambda: asyncio.to_thread(run_in_process_level, transcribe, workload, concurrency))
            return runners

        results = await run_interleaved(concurrency_levels, runners_for,
                                        lambda result: f"real-time factor {result['real_time_factor']:.1f}")
    return results


def format_speech_table(results: list[dict[str, Any]]) -> str:
    return format_levels_table(results, [("real-time factor", "real_time_factor"), ("requests/s", "requests_per_s")])


if __name__ == "__main__":  # a module of scripts/bench_serving.py: --help prints the docstring above
    from bench_levels import module_main

    module_main(__doc__)
