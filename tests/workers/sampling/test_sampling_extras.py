"""vLLM's sampling extras on the worker: allowed_token_ids, bad words, the logits processor registry, and prompt
logprobs (plan + model runner, against transformers)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from engine_core.protocol import SamplingParams
from tests.workers.harness import make_runner, prompt_ids
from workers.sampling import logits_processors as lp, sampler as sampler_module
from workers.sampling.prompt_logprobs import PromptLogprobsPlan, compute_prompt_logprobs
from workers.sampling.sampler import Sampler
from workers.sampling.state import RequestSamplingState, make_sampling_state

torch.set_num_threads(1)

VOCAB = 50


def make_logits(num_reqs: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_reqs, vocab, generator=torch.Generator().manual_seed(seed)) * 3.0


def state(output: list[int] | None = None, **params: Any) -> RequestSamplingState:
    return make_sampling_state(SamplingParams(**params), [], output or [], None, "cpu")


# --------------------------------------------------------------------------- allowed_token_ids


def test_allowed_token_ids_greedy_picks_the_best_allowed() -> None:
    logits = make_logits(3, seed=1)
    allowed = [3, 17, 42]
    states = [state(temperature=0.0, allowed_token_ids=allowed), state(temperature=0.0),
              state(temperature=0.0, allowed_token_ids=[9])]
    out = Sampler().sample(logits, states)
    assert out.token_ids[0] == max(allowed, key=lambda t: float(logits[0, t]))
    assert out.token_ids[1] == int(logits[1].argmax())  # a row without the list stays exact
    assert out.token_ids[2] == 9
    assert not out.errors


def test_allowed_token_ids_sampling_stays_inside_the_set() -> None:
    allowed = [1, 5, 30, 49]
    st = state(temperature=1.5, allowed_token_ids=allowed, seed=3)
    sampler = Sampler()
    drawn = {sampler.sample(make_logits(1, seed=i), [st]).token_ids[0] for i in range(200)}
    assert drawn <= set(allowed) and len(drawn) > 1


def test_allowed_token_ids_do_not_change_reported_logprobs() -> None:
    """Logprobs stay those of the raw logits (vLLM's default), whatever the masks."""
    logits = make_logits(1, seed=2)
    out = Sampler().sample(logits, [state(temperature=0.0, allowed_token_ids=[4, 8], logprobs=2)])
    raw = torch.log_softmax(logits[0], dim=-1)
    entry = out.logprobs[0][0]  # type: ignore[index]
    assert entry.logprob == pytest.approx(raw[out.token_ids[0]].item(), abs=1e-6)
    assert entry.top_token_ids == raw.topk(2).indices.tolist()


# --------------------------------------------------------------------------- bad words


def test_bad_words_ban_the_last_token_only_after_the_prefix() -> None:
    bad = [[7], [10, 11, 12], [20, 21]]
    assert lp.bad_word_bans(state(bad_words_token_ids=bad)) == [7]  # single-token words: always
    assert lp.bad_word_bans(state(output=[1, 10], bad_words_token_ids=bad)) == [7]  # prefix incomplete
    assert lp.bad_word_bans(state(output=[1, 10, 11], bad_words_token_ids=bad)) == [7, 12]
    assert lp.bad_word_bans(state(output=[20], bad_words_token_ids=bad)) == [7, 21]
    assert lp.bad_word_bans(state(output=[20, 5], bad_words_token_ids=bad)) == [7]
    assert lp.bad_word_bans(state(output=[20])) == []


def test_bad_words_in_the_sampler() -> None:
    logits = torch.zeros(2, VOCAB)
    logits[:, 12] = 10.0  # the model wants to complete the bad word
    logits[:, 13] = 5.0
    states = [state(temperature=0.0, output=[10, 11], bad_words_token_ids=[[10, 11, 12]]),
              state(temperature=0.0, output=[11, 11], bad_words_token_ids=[[10, 11, 12]])]
    assert Sampler().sample(logits, states).token_ids == [13, 12]


# --------------------------------------------------------------------------- logits processors


@pytest.fixture
def registry() -> Iterator[list[tuple[list[int], dict[str, Any]]]]:
    """Registers test processors (removed afterwards); yields the calls the recording one saw."""
    calls: list[tuple[list[int], dict[str, Any]]] = []

    @lp.register_logits_processor("test_record_and_prefer_last")
    def record(output_token_ids: list[int], logits: torch.Tensor, args: dict[str, Any]) -> torch.Tensor:
        calls.append((list(output_token_ids), dict(args)))
        new = logits.clone()
        new[args["prefer"]] += 1000.0
        return new  # returning a new row works as well as editing in place

    @lp.register_logits_processor("test_broken")
    def broken(output_token_ids: list[int], logits: torch.Tensor, args: dict[str, Any]) -> None:
        raise RuntimeError("boom")

    yield calls
    lp.unregister_logits_processor("test_record_and_prefer_last")
    lp.unregister_logits_processor("test_broken")


def test_builtin_processors_are_registered() -> None:
    assert {"ban_tokens", "force_tokens"} <= set(lp.registered_names())


def test_force_tokens_and_ban_tokens() -> None:
    sampler = Sampler()
    forced = state(temperature=1.0, seed=1, logits_processors=["force_tokens"],
                   logits_processor_args={"forced_token_ids": [5, 6, 7]})
    tokens = []
    for step in range(4):
        token = sampler.sample(make_logits(1, seed=step), [forced]).token_ids[0]
        forced.output_token_ids.append(token)
        tokens.append(token)
    assert tokens[:3] == [5, 6, 7]  # then free sampling
    logits = make_logits(1, seed=9)
    best = int(logits[0].argmax())
    banned = state(temperature=0.0, logits_processors=["ban_tokens"], logits_processor_args={"banned_token_ids": [best]})
    out = sampler.sample(logits, [banned])
    assert out.token_ids[0] == int(logits[0].topk(2).indices[1])


def test_custom_processor_gets_output_and_args(registry: list[tuple[list[int], dict[str, Any]]]) -> None:
    logits = make_logits(2, seed=4)
    st = state(temperature=0.0, output=[3, 4], logits_processors=["test_record_and_prefer_last"],
               logits_processor_args={"prefer": 11})
    out = Sampler().sample(logits, [st, state(temperature=0.0)])
    assert out.token_ids == [11, int(logits[1].argmax())]
    assert registry == [([3, 4], {"prefer": 11})]


def test_processor_errors_stay_with_their_row(registry: list[tuple[list[int], dict[str, Any]]]) -> None:
    logits = make_logits(4, seed=5)
    states = [state(temperature=0.0, logits_processors=["no_such_processor"]),
              state(temperature=0.0, logits_processors=["test_broken"]),
              state(temperature=0.0, logits_processors=["ban_tokens"], logits_processor_args={"banned_token_ids": "x"}),
              state(temperature=0.0)]
    out = Sampler().sample(logits, states)
    assert set(out.errors) == {0, 1, 2}
    assert out.errors[0].startswith("invalid vllm_xargs: unknown logits processor 'no_such_processor'")
    assert "ban_tokens" in out.errors[0]  # lists what is available
    assert out.errors[1] == "logits processor 'test_broken' failed: RuntimeError: boom"
    assert out.errors[2].startswith("invalid vllm_xargs for logits processor 'ban_tokens'")
    assert out.token_ids[3] == int(logits[3].argmax())


def test_load_plugins_imports_modules_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_conveyor_plugin.py").write_text(
        "from workers.logits_processors import register_logits_processor\n"
        "@register_logits_processor('test_from_env')\n"
        "def from_env(output_token_ids, logits, args):\n"
        "    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(lp.ENV_VAR, " my_conveyor_plugin , ")
    try:
        assert "test_from_env" in lp.load_plugins()
    finally:
        lp.unregister_logits_processor("test_from_env")


def test_plain_greedy_batch_skips_the_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests without extras take the argmax fast path: none of the extra stages runs."""
    def fail(*_: object) -> None:
        raise AssertionError("an extra stage ran for a plain greedy batch")

    monkeypatch.setattr(sampler_module, "apply_allowed_token_ids", fail)
    monkeypatch.setattr(sampler_module, "apply_logits_processors", fail)
    logits = make_logits(4, seed=6)
    out = Sampler().sample(logits, [state(temperature=0.0) for _ in range(4)])
    assert out.token_ids == logits.argmax(-1).tolist()


# --------------------------------------------------------------------------- prompt logprobs


def test_prompt_logprobs_plan_rows_and_targets() -> None:
    plan = PromptLogprobsPlan()
    tokens = [10, 11, 12, 13, 14]
    plan.add(0, tokens, 5, start=0, end=3, first_row=0, num_top=2)  # positions 0..2 score tokens 1..3
    plan.add(1, tokens, 5, start=3, end=5, first_row=7, num_top=0)  # position 3 scores token 4; 4 scores output
    plan.add(2, tokens, 5, start=4, end=5, first_row=9, num_top=0)  # only the last position: nothing
    assert plan.rows == [0, 1, 2, 7] and plan.targets == [11, 12, 13, 14]
    assert plan.spans == [(0, 0, 3), (1, 3, 1)]
    hidden = torch.randn(10, VOCAB, generator=torch.Generator().manual_seed(0))
    result = compute_prompt_logprobs(lambda h: h * 2.0, hidden, plan, 3, is_rank0=True)
    assert result is not None and result[2] is None
    raw = torch.log_softmax(hidden * 2.0, dim=-1)
    entries = result[0]
    assert entries is not None and len(entries) == 3
    for entry, row, target in zip(entries, [0, 1, 2], [11, 12, 13]):
        assert entry is not None
        assert entry.logprob == pytest.approx(raw[row, target].item(), abs=1e-6)
        assert entry.rank == int((raw[row] > raw[row, target]).sum()) + 1
        assert entry.top_token_ids == raw[row].topk(2).indices.tolist()
    assert result[1] is not None and result[1][0] is not None and result[1][0].top_token_ids == []
    assert compute_prompt_logprobs(lambda h: h, hidden, plan, 3, is_rank0=False) is None


@pytest.fixture(scope="module")
def llama_path(tiny_models: Path) -> str:
    return str(tiny_models / "llama")


def hf_prompt_logprobs(model_path: str, token_ids: list[int]) -> torch.Tensor:
    """[len - 1, vocab] log_softmax of transformers' logits at positions 0..len-2."""
    from tests.reference import load_reference

    model, _ = load_reference(model_path)
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("chunk", [None, 5])
def test_runner_prompt_logprobs_match_transformers(llama_path: str, chunk: int | None) -> None:
    """Whole prefill or 5-token chunks: entries for prompt tokens 1.. in order, equal to HF within 1e-3."""
    runner, driver = make_runner(llama_path, block_size=4, num_blocks=64)
    prompt = prompt_ids(13, 7)
    params = SamplingParams(temperature=0.0, prompt_logprobs=3, max_tokens=100)
    driver.add("p", prompt, params)
    driver.add("plain", prompt_ids(6, 8))  # no prompt logprobs: nothing for it
    collected: list[Any] = []
    while not driver.requests["p"].output_token_ids:
        request = driver.requests["p"]
        remaining = len(request.token_ids) - request.num_computed_tokens
        schedule = {"p": min(remaining, chunk) if chunk else remaining}
        if driver.requests["plain"].num_computed_tokens == 0:
            schedule["plain"] = 6
        output = driver.step(schedule)
        assert output.prompt_logprobs is not None
        if "plain" in output.request_ids:
            assert output.prompt_logprobs[output.request_ids.index("plain")] is None
        collected += output.prompt_logprobs[0] or []
    assert driver.step({"p": 1}).prompt_logprobs is None  # decoding: none any more
    reference = hf_prompt_logprobs(llama_path, prompt)
    assert len(collected) == len(prompt) - 1
    for position, entry in enumerate(collected):
        target = prompt[position + 1]
        assert entry.logprob == pytest.approx(reference[position, target].item(), abs=1e-3)
        assert entry.top_token_ids == reference[position].topk(3).indices.tolist()
        assert entry.top_logprobs == pytest.approx(reference[position].topk(3).values.tolist(), abs=1e-3)
