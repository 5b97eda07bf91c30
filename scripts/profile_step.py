"""Where one engine step's time goes: the scheduler, the wire (msgspec both ways), the worker's input
preparation, the forward pass by layer kind, the logits, sampling and the scheduler's bookkeeping.

    python scripts/profile_step.py [MODEL] [--batch-sizes 1 16] [--prompt-len 128] [--decode-steps 32]
                                   [--threads 2] [--dtype float32] [--result-json FILE]

Runs the real `Scheduler` and `ModelRunner` in this one process (the same code the engine core and rank 0 run;
only the ZeroMQ hop itself is left out, its msgspec encoding and decoding are timed), with MODEL resolved the way
`conveyor serve` resolves it (default: the embedded SmolLM2-135M-Instruct). For each batch size it prefills B
prompts of `--prompt-len` random tokens, then times `--decode-steps` decode steps of all B requests together.

Three passes per batch size: the first times the phases of each step (mean ms per step); the second times whole
steps with the decode stack off (`workers/models/llama_decode.py`: the layers one module at a time, as before it
existed); the third adds forward hooks on every layer of that layer-by-layer path to split the forward by layer
kind (the hooks cost a little, so the kinds are reported as shares of the hooked forward; the logits (LM head)
are a phase of their own). The frontend's share (HTTP, detokenizing, SSE) is what a served TPOT has on top
of the step total; `scripts/bench_serving.py` measures that TPOT.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# Forward-hook module names (the last dotted part) -> the layer kind they are counted under.
LAYER_KINDS = {
    "embed_tokens": "embedding", "qkv_proj": "linear: qkv", "o_proj": "linear: o", "rotary_emb": "rotary",
    "attn": "attention (paged)", "gate_up_proj": "linear: gate_up", "act_fn": "silu * mul",
    "down_proj": "linear: down", "input_layernorm": "rmsnorm", "post_attention_layernorm": "rmsnorm",
    "norm": "rmsnorm",
}
_ENCODER = msgspec.msgpack.Encoder()
PHASES = ("schedule", "wire: step to workers", "worker: update states", "worker: prepare inputs", "forward",
          "logits", "sample", "wire: result to core", "update_from_output", "wire: outputs to frontends")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="model folder or .gguf (default: the embedded one)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
                        help="torch threads (default: OMP_NUM_THREADS, else torch's choice)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--result-json", type=Path, default=None)
    return parser.parse_args(argv)


class PhaseTimer:
    """Accumulates wall time per phase name; `wrap` times every call of a callable."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.totals[name] += time.perf_counter() - started

        return timed

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.totals[name] += time.perf_counter() - started


def build_engine(args: argparse.Namespace) -> tuple[Any, Any]:
    """(scheduler, model runner) built from `conveyor serve`'s own flags and config path."""
    import torch

    from conveyor.config_from_args import engine_config_from_args
    from conveyor.flags import build_parser
    from engine_core.scheduler import Scheduler
    from workers.model_runner import ModelRunner

    if args.threads:
        torch.set_num_threads(args.threads)
    serve_argv = ["serve", *([args.model] if args.model else []), "--dtype", args.dtype,
                  "--max-num-seqs", str(max(args.batch_sizes)), "--device", "cpu"]
    config, _ = engine_config_from_args(build_parser().parse_args(serve_argv), "ipc:///unused")
    runner = ModelRunner(config.model, config.cache, torch.device("cpu"))
    num_blocks = runner.determine_num_blocks()
    runner.initialize_cache(num_blocks)
    return Scheduler(config.scheduler, config.cache, num_blocks), runner


_RUNNER_PHASES = {"_update_states": "worker: update states", "_prepare_inputs": "worker: prepare inputs",
                  "_forward": "forward", "_sample": "sample"}


@contextmanager
def instrument(runner: Any, timer: PhaseTimer) -> Iterator[None]:
    """Time the runner's phases by wrapping its methods on this instance (removed again on exit)."""
    for method, phase in _RUNNER_PHASES.items():
        setattr(runner, method, timer.wrap(phase, getattr(runner, method)))
    runner.model.compute_logits = timer.wrap("logits", runner.model.compute_logits)
    try:
        yield
    finally:
        for method in _RUNNER_PHASES:
            delattr(runner, method)
        del runner.model.compute_logits


def one_step(scheduler: Any, runner: Any, timer: PhaseTimer) -> int:
    """One engine step as the core and rank 0 run it, the wire included; returns the tokens it generated."""
    from engine_core.protocol import (EngineCoreOutputs, core_to_worker_decoder, engine_outputs_decoder,
                                      worker_to_core_decoder)

    encoder = _ENCODER
    with timer.phase("schedule"):
        step = scheduler.schedule()
    with timer.phase("wire: step to workers"):
        step = core_to_worker_decoder.decode(encoder.encode(step))
    result = runner.execute(step)
    with timer.phase("wire: result to core"):
        result = worker_to_core_decoder.decode(encoder.encode(result))
    with timer.phase("update_from_output"):
        outputs = scheduler.update_from_output(step, result)
    with timer.phase("wire: outputs to frontends"):
        for client_outputs in outputs.values():
            engine_outputs_decoder.decode(encoder.encode(EngineCoreOutputs(outputs=client_outputs)))
    return sum(len(output.new_token_ids) for client_outputs in outputs.values() for output in client_outputs)


def add_requests(scheduler: Any, batch_size: int, prompt_len: int, vocab_size: int, tag: str) -> None:
    from engine_core.protocol import EngineCoreRequest, SamplingParams

    rng = random.Random(batch_size)
    for i in range(batch_size):
        prompt = [rng.randrange(3, vocab_size) for _ in range(prompt_len)]
        scheduler.add_request(EngineCoreRequest(
            f"{tag}-{i}", prompt, SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True), None,
            time.time()))


@contextmanager
def layer_hooks(model: Any, totals: dict[str, float]) -> Iterator[None]:
    """Forward pre/post hooks timing every module whose name ends in one of LAYER_KINDS."""
    handles, starts = [], {}
    for name, module in model.named_modules():
        kind = LAYER_KINDS.get(name.rpartition(".")[2])
        if kind is None:
            continue

        def pre(module: Any, inputs: Any, key: int = id(module)) -> None:
            starts[key] = time.perf_counter()

        def post(module: Any, inputs: Any, output: Any, key: int = id(module), kind: str = kind) -> None:
            totals[kind] += time.perf_counter() - starts.pop(key)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def layer_by_layer(model: Any) -> Iterator[None]:
    """Decode steps through the layer modules (so hooks see them) instead of the one-call decode stack."""
    bodies = [module for module in model.modules() if hasattr(module, "use_decode_stack")]
    for body in bodies:
        body.use_decode_stack = False
    try:
        yield
    finally:
        for body in bodies:
            body.use_decode_stack = True


def profile_batch(scheduler: Any, runner: Any, args: argparse.Namespace, batch_size: int) -> dict[str, Any]:
    """Prefill `batch_size` prompts, then time decode steps: phases first, then layer kinds."""
    vocab_size = int(runner.hf_config.vocab_size)
    add_requests(scheduler, batch_size, args.prompt_len, vocab_size, f"b{batch_size}")
    untimed = PhaseTimer()
    while len(scheduler.running) < batch_size or any(r.num_output_tokens == 0 for r in scheduler.running):
        one_step(scheduler, runner, untimed)  # prefill (chunked as the engine would)
    for _ in range(args.warmup_steps):
        one_step(scheduler, runner, untimed)
    timer, hooked = PhaseTimer(), PhaseTimer()
    with instrument(runner, timer):
        step_ms = _timed_steps(scheduler, runner, timer, args.decode_steps)
    with layer_by_layer(runner.model):
        layer_by_layer_ms = _timed_steps(scheduler, runner, PhaseTimer(), args.decode_steps)
    kinds: dict[str, float] = defaultdict(float)
    with layer_by_layer(runner.model), layer_hooks(runner.model, kinds), instrument(runner, hooked):
        for _ in range(args.decode_steps):
            one_step(scheduler, runner, hooked)
    kinds["other (python and glue between layers)"] = max(0.0, hooked.totals["forward"] - sum(kinds.values()))
    scheduler.abort_requests([request.request_id for request in list(scheduler.running)])
    one_step(scheduler, runner, PhaseTimer())  # tells the runner to drop them
    phases = {name: timer.totals[name] * 1000 / args.decode_steps for name in PHASES}
    phases["unaccounted"] = max(0.0, step_ms - sum(phases.values()))
    forward_kinds = sum(kinds.values()) or 1.0
    return {"batch_size": batch_size, "step_ms": step_ms, "tokens_per_s": batch_size * 1000 / step_ms,
            "layer_by_layer_step_ms": layer_by_layer_ms,
            "phases_ms": phases, "forward_shares": {kind: value / forward_kinds for kind, value in kinds.items()}}


def _timed_steps(scheduler: Any, runner: Any, timer: PhaseTimer, steps: int) -> float:
    """Mean milliseconds per step over `steps` steps."""
    started = time.perf_counter()
    for _ in range(steps):
        one_step(scheduler, runner, timer)
    return (time.perf_counter() - started) * 1000 / steps


def format_report(results: list[dict[str, Any]]) -> str:
    sizes = [result["batch_size"] for result in results]
    lines = ["| phase (ms per step) | " + " | ".join(f"B={size}" for size in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for phase in [*PHASES, "unaccounted"]:
        lines.append(f"| {phase} | " + " | ".join(f"{r['phases_ms'][phase]:.2f}" for r in results) + " |")
    lines.append("| **step** | " + " | ".join(f"**{r['step_ms']:.2f}**" for r in results) + " |")
    lines.append("| tokens/s | " + " | ".join(f"{r['tokens_per_s']:.1f}" for r in results) + " |")
    lines.append("| step, layer by layer (no decode stack) | "
                 + " | ".join(f"{r['layer_by_layer_step_ms']:.2f}" for r in results) + " |")
    kinds = sorted({kind for r in results for kind in r["forward_shares"]},
                   key=lambda kind: -results[-1]["forward_shares"].get(kind, 0.0))
    lines += ["", "| forward by layer kind (share) | " + " | ".join(f"B={size}" for size in sizes) + " |",
              "|---|" + "---:|" * len(sizes)]
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(f"{100 * r['forward_shares'].get(kind, 0.0):.1f}%"
                                                 for r in results) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"[profile] building the engine (model {args.model or 'embedded default'}, {args.dtype})", flush=True)
    scheduler, runner = build_engine(args)
    results = []
    for batch_size in args.batch_sizes:
        print(f"[profile] B={batch_size}: prefill {batch_size} x {args.prompt_len} tokens, "
              f"{args.decode_steps} decode steps x 3 passes", flush=True)
        results.append(profile_batch(scheduler, runner, args, batch_size))
    import torch

    print(f"\nthreads {torch.get_num_threads()}, dtype {args.dtype}, prompt {args.prompt_len} tokens, "
          f"{args.decode_steps} decode steps per batch size\n")
    print(format_report(results))
    if args.result_json:
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                "results": results}, indent=1))


if __name__ == "__main__":
    main()
