"""ModelRunner driven by hand-built SchedulerOutputs: block sizes, mixed prefill + decode steps, partial chunks,
preemption, seeds, KV-cache sizing, attention metadata.

`RunnerDriver` (tests/workers/harness.py) plays the scheduler's part.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine_core.config import CacheConfig
from engine_core.protocol import SamplingParams
from tests.workers.harness import isolated_greedy, make_runner, prompt_ids
from workers.attention import build_attention_metadata
from workers.kv_cache_alloc import kv_cache_bytes_per_block

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def llama_path(tiny_models: Path) -> str:
    return str(tiny_models / "llama")


@pytest.fixture(scope="module")
def llama_expected(llama_path: str) -> dict[int, list[int]]:
    """prompt seed -> greedy continuation (6 tokens) of a 10-token prompt, computed alone."""
    return {seed: isolated_greedy(llama_path, prompt_ids(10, seed), 6) for seed in range(3)}


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_block_sizes_give_the_same_tokens(llama_path: str, llama_expected: dict[int, list[int]],
                                          block_size: int) -> None:
    _, driver = make_runner(llama_path, block_size=block_size, num_blocks=128)
    for seed in range(3):
        driver.add(f"r{seed}", prompt_ids(10, seed))
    driver.generate([f"r{seed}" for seed in range(3)], 6, chunk=4)
    for seed in range(3):
        assert driver.requests[f"r{seed}"].output_token_ids == llama_expected[seed]


def test_mixed_prefill_and_decode_in_one_step(llama_path: str, llama_expected: dict[int, list[int]]) -> None:
    _, driver = make_runner(llama_path, block_size=4, num_blocks=64)
    driver.add("a", prompt_ids(10, 0))
    driver.step({"a": 10})  # prefill a
    driver.add("b", prompt_ids(10, 1))
    driver.add("c", prompt_ids(10, 2))
    output = driver.step({"a": 1, "b": 10, "c": 6})  # decode a + full prefill b + first chunk of c
    assert [len(s) for s in output.sampled_token_ids] == [1, 1, 0]
    assert output.logprobs[2] is None
    driver.step({"a": 1, "b": 1, "c": 4})  # decode, decode, last chunk of c
    driver.generate(["a", "b", "c"], 6)
    for seed, request_id in enumerate("abc"):
        assert driver.requests[request_id].output_token_ids == llama_expected[seed]


def test_prompt_of_one_token_and_finished_requests_are_dropped(llama_path: str) -> None:
    runner, driver = make_runner(llama_path, block_size=4, num_blocks=32)
    driver.add("one", [5])
    driver.add("two", prompt_ids(7, 9))
    driver.generate(["one", "two"], 3)
    assert driver.requests["one"].output_token_ids == isolated_greedy(llama_path, [5], 3)
    assert runner.requests["one"].sampling.output_token_ids == driver.requests["one"].output_token_ids
    driver.finish(["one", "two"])
    output = driver.step({})
    assert output.request_ids == [] and runner.requests == {}


def test_preempted_request_resumes_with_its_generated_tokens(llama_path: str,
                                                             llama_expected: dict[int, list[int]]) -> None:
    _, driver = make_runner(llama_path, block_size=4, num_blocks=32)
    prompt = prompt_ids(10, 0)
    resumed = prompt + llama_expected[0][:3]  # as if preempted after 3 tokens: recompute everything
    driver.add("p", resumed, num_prompt_tokens=len(prompt))
    driver.generate(["p"], 3)
    assert driver.requests["p"].output_token_ids == llama_expected[0][3:6]


def test_seeded_requests_repeat_their_draws(llama_path: str) -> None:
    _, driver = make_runner(llama_path, block_size=4, num_blocks=64)
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=100)
    for request_id in ("s1", "s2"):
        driver.add(request_id, prompt_ids(6, 3), params=seeded)
    driver.add("other", prompt_ids(8, 4), params=SamplingParams(temperature=1.0, max_tokens=100))
    driver.generate(["s1", "s2", "other"], 5)
    assert driver.requests["s1"].output_token_ids == driver.requests["s2"].output_token_ids


def test_bfloat16_runs(llama_path: str) -> None:
    runner, driver = make_runner(llama_path, block_size=4, num_blocks=32, dtype="bfloat16")
    assert runner.kv_caches[0].dtype == torch.bfloat16
    driver.add("x", prompt_ids(9, 1))
    driver.generate(["x"], 3)
    assert len(driver.requests["x"].output_token_ids) == 3


def test_bfloat16_kv_cache_under_a_float32_model(llama_path: str) -> None:
    """--kv-cache-dtype bfloat16: half the bytes per block; the keys and values are rounded, so the logprobs
    move a little, and the same request gives the same tokens alone and batched."""
    runner, driver = make_runner(llama_path, block_size=4, num_blocks=64, kv_cache_dtype="bfloat16")
    assert runner.kv_caches[0].dtype == torch.bfloat16 and runner.dtype == torch.float32
    assert kv_cache_bytes_per_block(runner.model, 4, runner.kv_cache_dtype) * 2 == kv_cache_bytes_per_block(
        runner.model, 4, torch.float32)
    _, full = make_runner(llama_path, block_size=4, num_blocks=64)
    for d in (driver, full):
        for seed in range(3):
            d.add(f"r{seed}", prompt_ids(10, seed))
        d.generate([f"r{seed}" for seed in range(3)], 6, chunk=4)
    _, alone = make_runner(llama_path, block_size=4, num_blocks=64, kv_cache_dtype="bfloat16")
    alone.add("r0", prompt_ids(10, 0))
    alone.generate(["r0"], 6)
    assert alone.requests["r0"].output_token_ids == driver.requests["r0"].output_token_ids
    for seed in range(3):
        got, ref = driver.requests[f"r{seed}"], full.requests[f"r{seed}"]
        agreeing = 0
        while agreeing < 6 and got.output_token_ids[agreeing] == ref.output_token_ids[agreeing]:
            agreeing += 1
        assert agreeing >= 1  # the first token comes from the prefill, before any cached key is read
        for a, b in zip(got.output_logprobs[:agreeing], ref.output_logprobs[:agreeing]):
            assert abs(a - b) < 0.05


def test_kv_cache_sizing(llama_path: str) -> None:
    runner, _ = make_runner(llama_path, block_size=16, num_blocks=10)
    assert runner.determine_num_blocks() == 10  # the override wins
    per_block = kv_cache_bytes_per_block(runner.model, 16, torch.float32)
    assert per_block == 2 * 2 * 16 * 2 * 16 * 4  # k+v, layers, block, kv heads, head_dim, float32
    assert len(runner.kv_caches) == 2 and runner.kv_caches[0].shape == (2, 10, 16, 2, 16)
    runner.cache_config = CacheConfig(block_size=16, kv_cache_memory_bytes=per_block * 7 + 5)
    assert runner.determine_num_blocks() == 7
    runner.cache_config = CacheConfig(block_size=16)  # default: a fraction of RAM, capped by max_model_len
    assert 0 < runner.determine_num_blocks() <= 256 * 512 // 16


def test_attention_metadata_layout() -> None:
    metadata = build_attention_metadata(query_lens=[3, 1, 1], seq_lens=[5, 6, 1],
                                        block_tables=[[7, 2], [4, 9], [3]], block_size=4,
                                        device=torch.device("cpu"))
    assert metadata.query_start_loc == [0, 3, 4, 5]
    assert metadata.positions.tolist() == [2, 3, 4, 5, 0]
    assert metadata.slot_mapping.tolist() == [7 * 4 + 2, 7 * 4 + 3, 2 * 4 + 0, 9 * 4 + 1, 3 * 4 + 0]
    assert metadata.block_tables.tolist() == [[7, 2], [4, 9], [3, 0]]
    (span,) = metadata.prefills
    assert (span.token_start, span.token_end) == (0, 3)
    assert span.context_block_ids is not None and span.context_block_ids.tolist() == [7, 2]
    assert span.mask is not None and span.mask.sum(dim=1).tolist() == [3, 4, 5]  # causal after 2 cached tokens
    assert metadata.decode_token_indices is not None and metadata.decode_token_indices.tolist() == [3, 4]
    assert metadata.decode_block_tables is not None and metadata.decode_block_tables.tolist() == [[4, 9], [3, 0]]
    assert metadata.decode_mask is not None and metadata.decode_mask.shape == (2, 1, 1, 8)
    assert metadata.decode_mask.sum(dim=-1).flatten().tolist() == [6, 1]
    assert not metadata.all_decode


def _tp_worker(rank: int, world_size: int, port: int, model_paths: list[str], out_dir: str, transport: str) -> None:
    """One rank: prefill, then a step mixing a decode and a prefill; rank 0 saves the logits."""
    import torch.distributed as dist

    from workers.distributed import tensor_parallel

    from workers.kv_cache_alloc import allocate_kv_caches
    from workers.loading.loader import load_hf_config
    from workers.models import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    cpu = torch.device("cpu")
    if transport == "shm":
        tensor_parallel.init(rank, world_size, cpu)
        assert tensor_parallel._shm is not None, "ranks on one host share memory"
    for index, path in enumerate(model_paths):
        model = build_model(load_hf_config(path), path, torch.float32, cpu, rank, world_size)
        caches = allocate_kv_caches(model, 16, 4, torch.float32, cpu)
        token_ids = torch.tensor(prompt_ids(13, seed=index))  # [13]
        with torch.inference_mode():
            first = build_attention_metadata([13], [13], [[3, 5, 7, 9]], 4, cpu)
            logits = [model.compute_logits(model(token_ids, first.positions, caches, first))]
            second = build_attention_metadata([1, 5], [14, 5], [[3, 5, 7, 9], [1, 2]], 4, cpu)
            step_ids = torch.cat([token_ids[:1], token_ids[:5]])  # [6]
            logits.append(model.compute_logits(model(step_ids, second.positions, caches, second)))
        if rank == 0:
            torch.save(logits, os.path.join(out_dir, f"tp{world_size}-{transport}-{index}.pt"))
    dist.barrier()  # leave together, then skip teardown: gloo's destructors can SIGABRT a rank whose peer
    os._exit(0)  # exits first (seen about 1 run in 6 even after the barrier); the results are already saved


@pytest.mark.parametrize("transport", ["gloo", "shm"])
def test_tensor_parallel_two_ranks_match_one(tiny_models: Path, tmp_path: Path, transport: str) -> None:
    """Column/row-parallel linears, vocab-parallel embedding (tied for Llama) and LM head, collectives over gloo
    or shared memory (workers/distributed)."""
    import socket

    import torch.multiprocessing as mp

    paths = [str(tiny_models / "llama"), str(tiny_models / "qwen2")]
    for world_size in (1, 2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(_tp_worker, args=(world_size, port, paths, str(tmp_path), transport if world_size > 1 else "none"),
                 nprocs=world_size)
    for index in range(len(paths)):
        single = torch.load(tmp_path / f"tp1-none-{index}.pt")
        sharded = torch.load(tmp_path / f"tp2-{transport}-{index}.pt")
        for expected, got in zip(single, sharded):
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
