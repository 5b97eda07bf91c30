"""What the embeddings and transcriptions benchmarks share: interleaved concurrency levels, latency percentiles and
the markdown table.

A module, not a script: `python scripts/bench_serving.py --help` shows how to run the benchmarks.
"""
from __future__ import annotations

import statistics
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import aiohttp

Runner = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class HttpTarget:
    name: str
    base_url: str  # without the trailing /v1


async def served_model_name(client: aiohttp.ClientSession, base_url: str) -> str:
    """The first model a server lists on /v1/models: what its requests name."""
    async with client.get(f"{base_url}/v1/models") as response:
        response.raise_for_status()
        return str((await response.json())["data"][0]["id"])


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
