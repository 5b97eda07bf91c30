#!/usr/bin/env python3
"""Benchmark OpenAI-compatible servers on /v1/completions with streaming (or /v1/embeddings), side by side.

`--mode embeddings` measures sentences/s on /v1/embeddings instead (see scripts/bench_embeddings.py),
`--mode transcriptions` the real-time factor on /v1/audio/transcriptions (see scripts/bench_speech.py), and
`--mode multimodal` streamed chat completions with one image each, with these same columns and an optional
transformers generate() baseline (see scripts/bench_multimodal.py).

    python scripts/bench_serving.py --tokenizer $PEERS_DIR/smollm2-hf \\
        --target conveyor=http://127.0.0.1:8100 --target vllm=http://127.0.0.1:8200 \\
        --input-len 128 --output-len 128 --concurrency 1 4 16 --result-json bench_results/run.json

($PEERS_DIR: where scripts/setup_peers.sh puts the peers and the model, by default
${XDG_CACHE_HOME:-$HOME/.cache}/conveyor/peers.)

Workload: `--num-prompts` random prompts per concurrency level (default max(8, 2 x concurrency)), each
made of random token ids from the tokenizer (tokenizer.json of `--tokenizer DIR`) decoded to text and
re-encoded until it is `--input-len` tokens long; or a JSONL file (`--dataset`) of
{"prompt": ..., "max_tokens": ...} lines, cycled. Every target gets the same prompts; levels run in
order and, within a level, the targets run one after another with the order rotated per level, so
machine noise is shared fairly. Requests are sent greedily (temperature 0) with `ignore_eos` when
the server accepts it (probed once per target), so each request makes exactly max_tokens tokens.

Per level and target: request, output and total token throughput; TTFT; TPOT = (e2e - ttft) /
(output_tokens - 1) per request; ITL = gaps between streamed chunks; e2e latency (mean, p50, p99, in
ms). Output tokens come from the streamed `usage` (stream_options.include_usage) when present, else
from the number of streamed token chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import httpx
from bench_client import PromptSpec, RequestResult, Target, TargetSession, open_session, send_request

# How one request is sent and timed: bench_client.send_request (completions) or bench_multimodal.send_chat.
Sender = Callable[[httpx.AsyncClient, TargetSession, Any, float], Awaitable[RequestResult]]
# An in-process baseline: (a level's specs, concurrency, progress callback) -> (results, duration_s).
Baseline = Callable[[list[Any], int, Callable[[int], None]], tuple[list[RequestResult], float]]


# ----------------------------------------------------------------------------- workload


def parse_target(text: str) -> Target:
    name, sep, url = text.partition("=")
    if not sep or not name or not url:
        raise argparse.ArgumentTypeError(f"expected NAME=BASE_URL, got {text!r}")
    url = url.rstrip("/")
    return Target(name, url[: -len("/v1")] if url.endswith("/v1") else url)


def load_tokenizer(folder: str) -> Any:
    from tokenizers import Tokenizer

    path = Path(folder)
    return Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))


def random_prompt(tokenizer: Any, num_tokens: int, rng: random.Random, candidate_ids: list[int]) -> PromptSpec:
    """A prompt of random (non-special) tokens whose re-encoding has about `num_tokens` tokens."""
    token_ids = [rng.choice(candidate_ids) for _ in range(num_tokens)]
    text = tokenizer.decode(token_ids)
    for _ in range(10):  # decode/encode is not a round trip: trim or extend until the length settles
        encoded = tokenizer.encode(text, add_special_tokens=False).ids
        if len(encoded) == num_tokens:
            break
        if len(encoded) > num_tokens:
            text = tokenizer.decode(encoded[:num_tokens])
        else:
            text = text + tokenizer.decode([rng.choice(candidate_ids) for _ in range(num_tokens - len(encoded))])
    num_prompt_tokens = len(tokenizer.encode(text, add_special_tokens=False).ids)
    return PromptSpec(text, num_prompt_tokens, 0)


def random_workload(tokenizer: Any, num_prompts: int, input_len: int, output_len: int, seed: int) -> list[PromptSpec]:
    rng = random.Random(seed)
    special_ids = set(tokenizer.get_added_tokens_decoder())
    candidate_ids = [i for i in range(tokenizer.get_vocab_size()) if i not in special_ids]
    specs = [random_prompt(tokenizer, input_len, rng, candidate_ids) for _ in range(num_prompts)]
    return [PromptSpec(s.prompt, s.num_prompt_tokens, output_len) for s in specs]


def dataset_workload(path: str, num_prompts: int, tokenizer: Any | None, default_max_tokens: int) -> list[PromptSpec]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{path}: no prompts")
    specs = []
    for i in range(num_prompts):
        row = rows[i % len(rows)]
        num_tokens = len(tokenizer.encode(row["prompt"], add_special_tokens=False).ids) if tokenizer else 0
        specs.append(PromptSpec(row["prompt"], num_tokens, int(row.get("max_tokens", default_max_tokens))))
    return specs


# ----------------------------------------------------------------------------- one level


class Progress:
    """A one-line in-place counter on stderr (only redrawn on a terminal)."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.done = label, total, 0
        self.enabled, self.tty = enabled, sys.stderr.isatty()
        self.start = time.perf_counter()
        self._draw()

    def advance(self, count: int = 1) -> None:
        self.done += count
        self._draw()

    def close(self) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            sys.stderr.write(f"\r{self.label}: {self.done}/{self.total} in {elapsed:.1f}s\n")
            sys.stderr.flush()

    def _draw(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write(f"\r{self.label}: {self.done}/{self.total}")
            sys.stderr.flush()


async def run_level(client: httpx.AsyncClient, session: TargetSession, specs: list[Any],
                    concurrency: int, temperature: float, show_progress: bool,
                    send: Sender = send_request) -> dict[str, Any]:
    semaphore = asyncio.Semaphore(concurrency)
    progress = Progress(f"{session.target.name} c={concurrency}", len(specs), show_progress)

    async def one(spec: Any) -> RequestResult:
        async with semaphore:
            result = await send(client, session, spec, temperature)
        progress.advance()
        return result

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    results = await asyncio.gather(*(one(spec) for spec in specs))
    duration_s = time.perf_counter() - start
    progress.close()
    # The machine's 1-minute load average around the level: a noisy neighbour shows up here.
    return {**summarize(session, concurrency, results, duration_s),
            "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


async def run_baseline_level(session: TargetSession, baseline: Baseline, specs: list[Any], concurrency: int,
                             show_progress: bool) -> dict[str, Any]:
    """An in-process baseline's level (on a thread, so the event loop stays free), summarized as a server's."""
    progress = Progress(f"{session.target.name} c={concurrency}", len(specs), show_progress)
    load_before = os.getloadavg()[0]
    results, duration_s = await asyncio.to_thread(baseline, specs, concurrency, progress.advance)
    progress.close()
    return {**summarize(session, concurrency, results, duration_s),
            "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def _stats_ms(values_s: list[float]) -> dict[str, float | None]:
    if not values_s:
        return {"mean": None, "median": None, "p99": None}
    ordered = sorted(v * 1000.0 for v in values_s)
    rank = 0.99 * (len(ordered) - 1)  # linear interpolation, as numpy.percentile
    low = int(rank)
    p99 = ordered[low] + (ordered[min(low + 1, len(ordered) - 1)] - ordered[low]) * (rank - low)
    return {"mean": statistics.fmean(ordered), "median": statistics.median(ordered), "p99": p99}


def summarize(session: TargetSession, concurrency: int, results: list[RequestResult],
              duration_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    num_output_tokens = sum(r.num_output_tokens for r in ok)
    num_input_tokens = sum(r.num_prompt_tokens for r in ok)
    return {
        "target": session.target.name, "base_url": session.target.base_url, "model": session.model,
        "ignore_eos": session.ignore_eos, "concurrency": concurrency, "num_prompts": len(results),
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration_s,
        "total_input_tokens": num_input_tokens, "total_output_tokens": num_output_tokens,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": num_output_tokens / duration_s,
        "total_token_throughput": (num_input_tokens + num_output_tokens) / duration_s,
        "ttft_ms": _stats_ms([r.ttft_s for r in ok]),
        "tpot_ms": _stats_ms([(r.e2e_s - r.ttft_s) / (r.num_output_tokens - 1)
                              for r in ok if r.num_output_tokens > 1]),
        "itl_ms": _stats_ms([gap for r in ok for gap in r.chunk_gaps_s]),
        "e2e_ms": _stats_ms([r.e2e_s for r in ok]),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


# ----------------------------------------------------------------------------- all levels, all targets


async def run_benchmark(args: argparse.Namespace, workloads: dict[int, list[Any]], send: Sender = send_request,
                        baseline: tuple[TargetSession, Baseline] | None = None) -> list[dict[str, Any]]:
    """Every level, every target (and the in-process `baseline`, when given) in a rotated order per level."""
    # Idle connections expire before the servers' own keep-alive timeouts (llama.cpp: 5 s), so a
    # request never goes out on a socket the server is closing.
    limits = httpx.Limits(max_connections=max(args.concurrency) + 4,
                          max_keepalive_connections=max(args.concurrency) + 4, keepalive_expiry=2.0)
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        sessions = [await open_session(client, t, args.model, args.ignore_eos) for t in args.target]
        if not args.no_warmup:
            first_spec = workloads[args.concurrency[0]][0]
            short = replace(first_spec, max_tokens=max(2, min(first_spec.max_tokens, 16)))
            for session in sessions:
                result = await send(client, session, short, args.temperature)
                if not result.ok:
                    raise SystemExit(f"warm-up request to {session.target.name} failed: {result.error}")
            if baseline is not None:
                baseline[1]([short], 1, lambda _: None)
        everyone = sessions + ([baseline[0]] if baseline else [])
        results = []
        for level_index, concurrency in enumerate(args.concurrency):
            rotation = level_index % len(everyone)
            for session in everyone[rotation:] + everyone[:rotation]:
                specs, progress = workloads[concurrency], not args.no_progress
                if baseline is not None and session is baseline[0]:
                    results.append(await run_baseline_level(session, baseline[1], specs, concurrency, progress))
                else:
                    results.append(await run_level(client, session, specs, concurrency, args.temperature,
                                                   progress, send))
    order = {t.name: i for i, t in enumerate(args.target)}
    order.update({baseline[0].target.name: len(order)} if baseline else {})
    return sorted(results, key=lambda r: (r["concurrency"], order[r["target"]]))


# ----------------------------------------------------------------------------- report


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(results: list[dict[str, Any]]) -> str:
    """A markdown table, one row per (concurrency, target)."""
    header = ["target", "conc", "ok/n", "req/s", "out tok/s", "total tok/s",
              "TTFT mean", "TTFT p50", "TTFT p99", "TPOT mean", "TPOT p50", "TPOT p99",
              "ITL mean", "ITL p50", "ITL p99", "E2E mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in results:
        cells = [r["target"], str(r["concurrency"]), f"{r['completed']}/{r['num_prompts']}",
                 _fmt(r["request_throughput"], 2), _fmt(r["output_throughput"]), _fmt(r["total_token_throughput"])]
        for metric in ("ttft_ms", "tpot_ms", "itl_ms"):
            cells += [_fmt(r[metric]["mean"]), _fmt(r[metric]["median"]), _fmt(r[metric]["p99"])]
        cells.append(_fmt(r["e2e_ms"]["mean"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n(latencies in ms; TPOT = (e2e - TTFT) / (output tokens - 1) per request)\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["completions", "embeddings", "transcriptions", "multimodal"],
                   default="completions")
    p.add_argument("--image-size", type=int, default=224, help="multimodal: side of each random square PNG")
    p.add_argument("--same-image", action="store_true", help="multimodal: one image for every request")
    p.add_argument("--audio", nargs="+", default=[], help="transcriptions: the clips to upload (cycled)")
    p.add_argument("--num-requests", type=int, default=32, help="transcriptions: uploads per level")
    p.add_argument("--num-sentences", type=int, default=512, help="embeddings: sentences per level")
    p.add_argument("--in-process", metavar="MODEL_DIR",
                   help="embeddings: add sentence-transformers encode() on this folder as an in-process baseline; "
                        "transcriptions: transformers generate() on this Hugging Face Whisper folder; "
                        "multimodal: transformers generate() on this LLaVA / Qwen2-VL folder")
    p.add_argument("--target", action="append", type=parse_target, default=[], metavar="NAME=BASE_URL",
                   help="a server to benchmark (repeatable); BASE_URL like http://127.0.0.1:8000")
    p.add_argument("--base-url", help="shorthand for a single --target NAME=BASE_URL named 'server'")
    p.add_argument("--model", help="model name sent in requests (default: the first of each target's /v1/models)")
    p.add_argument("--tokenizer", help="folder with tokenizer.json (or the file): builds random prompts, counts tokens")
    p.add_argument("--dataset", help="JSONL of {\"prompt\", \"max_tokens\"} instead of random prompts")
    p.add_argument("--input-len", type=int, default=128, help="random prompts: tokens per prompt")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens per request (dataset default too)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--num-prompts", type=int, help="requests per level (default: max(8, 2 x concurrency))")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", choices=["auto", "on", "off"], default="auto",
                   help="send ignore_eos: auto = when the server accepts it (probed once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--result-json", help="write the config and per-level results here")
    p.add_argument("--result-md", help="write the markdown table here")
    p.add_argument("--note", default="", help="free text stored in the result JSON (e.g. server settings)")
    p.add_argument("--combine", nargs="+", metavar="JSON",
                   help="no benchmark: merge earlier --result-json files into one table (and JSON)")
    args = p.parse_args(argv)
    if args.combine:
        return args
    if args.base_url:
        args.target.append(parse_target(f"server={args.base_url}"))
    if not args.target and not (args.mode == "multimodal" and args.in_process):
        p.error("give at least one --target NAME=BASE_URL (or --base-url)")
    if len({t.name for t in args.target}) != len(args.target):
        p.error("target names must be unique")
    if args.mode == "completions" and not args.dataset and not args.tokenizer:
        p.error("random prompts need --tokenizer DIR (or give --dataset FILE)")
    return args


def build_workloads(args: argparse.Namespace) -> dict[int, list[PromptSpec]]:
    """The prompts of each concurrency level (the same for every target)."""
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    workloads = {}
    for concurrency in args.concurrency:
        num_prompts = args.num_prompts or max(8, 2 * concurrency)
        if args.dataset:
            workloads[concurrency] = dataset_workload(args.dataset, num_prompts, tokenizer, args.output_len)
        else:
            workloads[concurrency] = random_workload(tokenizer, num_prompts, args.input_len, args.output_len,
                                                     args.seed + concurrency)
    return workloads


def combine(paths: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Merge result files (e.g. one per server, run one after another) into one result set."""
    runs = [json.loads(Path(path).read_text()) for path in paths]
    results = [r for run in runs for r in run["results"]]
    results.sort(key=lambda r: r["concurrency"])  # stable: keeps the file order within a level
    return {"combined_from": paths, "configs": [run["config"] for run in runs]}, results


def write_outputs(args: argparse.Namespace, config: dict[str, Any], results: list[dict[str, Any]]) -> None:
    table = format_table(results)
    print(table)
    save_results(args, config, results, table)


def save_results(args: argparse.Namespace, config: dict[str, Any], results: list[dict[str, Any]], md: str) -> None:
    """The config and results to --result-json, `md` to --result-md (each only when given)."""
    if args.result_json:
        Path(args.result_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result_json).write_text(json.dumps({"config": config, "results": results}, indent=2) + "\n")
    if args.result_md:
        Path(args.result_md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result_md).write_text(md)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.combine:
        write_outputs(args, *combine(args.combine))
        return 0
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if args.mode == "embeddings":
        return _main_embeddings(args, started_at)
    if args.mode == "transcriptions":
        return _main_transcriptions(args, started_at)
    if args.mode == "multimodal":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_multimodal import multimodal_parts
        results = asyncio.run(run_benchmark(args, *multimodal_parts(args)))
    else:
        results = asyncio.run(run_benchmark(args, build_workloads(args)))
    config = {k: v for k, v in vars(args).items() if k not in ("target", "base_url", "combine")}
    config["targets"] = [asdict(t) for t in args.target]
    config["started_at"] = started_at
    write_outputs(args, config, results)
    return 1 if any(r["failed"] for r in results) else 0


def _main_embeddings(args: argparse.Namespace, started_at: str) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_embeddings import format_embeddings_table, run_embeddings_benchmark
    from bench_levels import HttpTarget

    targets = [HttpTarget(t.name, t.base_url) for t in args.target]
    results = asyncio.run(run_embeddings_benchmark(targets, args.concurrency, args.num_sentences, args.seed,
                                                   args.in_process, warmup=not args.no_warmup,
                                                   timeout_s=args.request_timeout))
    config = {"mode": "embeddings", "num_sentences": args.num_sentences}
    return _write_mode_outputs(args, started_at, config, results, format_embeddings_table(results))


def _main_transcriptions(args: argparse.Namespace, started_at: str) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_levels import HttpTarget
    from bench_speech import format_speech_table, run_speech_benchmark

    if not args.audio:
        raise SystemExit("--mode transcriptions needs --audio FILE...")
    targets = [HttpTarget(t.name, t.base_url) for t in args.target]
    results = asyncio.run(run_speech_benchmark(targets, args.audio, args.concurrency, args.num_requests,
                                               args.in_process, warmup=not args.no_warmup,
                                               timeout_s=args.request_timeout))
    config = {"mode": "transcriptions", "audio": args.audio, "num_requests": args.num_requests}
    return _write_mode_outputs(args, started_at, config, results, format_speech_table(results))


def _write_mode_outputs(args: argparse.Namespace, started_at: str, config: dict[str, Any],
                        results: list[dict[str, Any]], table: str) -> int:
    print(table)
    config.update(targets=[asdict(t) for t in args.target], concurrency=args.concurrency,
                  in_process=args.in_process, started_at=started_at, note=args.note)
    save_results(args, config, results, table + "\n")
    return 1 if any(r["failed"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
