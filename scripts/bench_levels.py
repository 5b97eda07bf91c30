"""What the embeddings and transcriptions benchmarks share: interleaved concurrency levels, latency percentiles and
the markdown table.

A module, not a script: `python scripts/bench_serving.py --help` shows how to run the benchmarks.
"""
from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, NoReturn, TypeVar

import aiohttp

Runner = Callable[[], Awaitable[dict[str, Any]]]
Item = TypeVar("Item")


@dataclass(frozen=True)
class HttpTarget:
    name: str
    base_url: str  # without the trailing /v1


async def served_model_name(client: aiohttp.ClientSession, base_url: str) -> str:
    """The first model a server lists on /v1/models: what its requests name."""
    async with client.get(f"{base_url}/v1/models") as response:
        response.raise_for_status()
        return str((await response.json())["data"][0]["id"])


@contextlib.asynccontextmanager
async def http_session(targets: list[HttpTarget], concurrency_levels: list[int],
                       timeout_s: float) -> AsyncIterator[tuple[aiohttp.ClientSession, dict[str, str]]]:
    """One client session for every target, and each target's served model name.

    aiohttp, not httpx: at 64 connections httpx's client spent ~5 ms of CPU per request, taken from the servers on
    a 2-core machine."""
    connector = aiohttp.TCPConnector(limit=max(concurrency_levels) + 8)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as client:
        yield client, {target.name: await served_model_name(client, target.base_url) for target in targets}


@dataclass
class LevelRun(Generic[Item]):
    """What one level's requests came to: a latency per answered item, an error line per failed one."""

    duration_s: float = 0.0
    answered: list[Item] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def send_all(items: list[Item], concurrency: int,
                   send: Callable[[Item], Awaitable[str | None]]) -> LevelRun[Item]:
    """`items` in order by `concurrency` workers; `send` answers None when the server answered well, else an error
    line. Latency is measured around each `send`."""
    queue = list(reversed(items))
    run: LevelRun[Item] = LevelRun()

    async def worker() -> None:
        while queue:
            item = queue.pop()
            started = time.perf_counter()
            error = await send(item)
            if error is not None:
                run.errors.append(error)
                continue
            run.latencies.append(time.perf_counter() - started)
            run.answered.append(item)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    run.duration_s = time.perf_counter() - started
    return run


async def post_checked(response_context: Any, must_contain: bytes) -> str | None:
    """None for a 200 whose body contains `must_contain`, else the error line."""
    async with response_context as response:
        body = await response.read()
        if response.status != 200 or must_contain not in body:
            return f"{response.status}: {body[:200]!r}"
    return None


HttpLevel = Callable[[aiohttp.ClientSession, HttpTarget, str, list[Any], int], Awaitable[dict[str, Any]]]


def http_runners(client: aiohttp.ClientSession, targets: list[HttpTarget], models: dict[str, str],
                 run_level: HttpLevel, items: list[Any], concurrency: int) -> list[Runner]:
    """One runner per target: `run_level` on `items` at `concurrency`."""
    return [(lambda target=target: run_level(client, target, models[target.name], items, concurrency))
            for target in targets]


async def warm_up(client: aiohttp.ClientSession, targets: list[HttpTarget], models: dict[str, str],
                  run_level: HttpLevel, items: list[Any], concurrency: int) -> None:
    for runner in http_runners(client, targets, models, run_level, items, concurrency):
        await runner()


def latency_stats(latencies_s: list[float]) -> dict[str, float | None]:
    """Mean, p50 and p99 in milliseconds (None without samples)."""
    ordered = sorted(latencies_s)

    def pct(q: float) -> float | None:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else None

    return {"latency_ms_mean": statistics.fmean(ordered) * 1000 if ordered else None,
            "latency_ms_p50": pct(0.5), "latency_ms_p99": pct(0.99)}


async def run_interleaved(concurrency_levels: list[int], runners_for: Callable[[int], list[Runner]],
                          headline: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    """Each level's runners (one per target) one after another, the order rotated per level so machine noise is
    shared fairly; a progress line per result."""
    results = []
    for level_index, concurrency in enumerate(concurrency_levels):
        runners = runners_for(concurrency)
        shift = level_index % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            result = await runner()
            failed = f" ({result['failed']} failed: {result['errors'][0]})" if result["failed"] else ""
            print(f"[bench] c={concurrency} {result['target']}: {headline(result)}{failed}", flush=True)
            results.append(result)
    return results


def format_levels_table(results: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A markdown table: concurrency, target, then `columns` (header, result key), latencies, failures."""
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    keys = [key for _, key in columns] + ["latency_ms_mean", "latency_ms_p50", "latency_ms_p99"]
    headers = [header for header, _ in columns] + ["latency mean ms", "p50 ms", "p99 ms"]
    lines = ["| concurrency | target | " + " | ".join(headers) + " | failed |",
             "|---:|---|" + "---:|" * len(headers) + "---:|"]
    for r in sorted(results, key=lambda r: (r["concurrency"], r["target"])):
        lines.append(f"| {r['concurrency']} | {r['target']} | " + " | ".join(fmt(r[key]) for key in keys)
                     + f" | {r['failed']} |")
    return "\n".join(lines)


def module_main(doc: str | None) -> NoReturn:
    """What a module of scripts/bench_serving.py does when run as a script: -h/--help prints its docstring and
    exits 0; anything else says to run bench_serving.py and exits 2."""
    name = Path(sys.argv[0]).name
    text = f"usage: python scripts/bench_serving.py ... ({name} is a module of it, not a script)\n\n{doc or ''}"
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(text.rstrip())
        sys.exit(0)
    print(text.rstrip(), file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    module_main(__doc__)
