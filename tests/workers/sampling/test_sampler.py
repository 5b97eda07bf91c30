"""Sampler: every transform against a plain per-row reference, seeds, the sampled distribution, logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from engine_core.protocol import SamplingParams
from workers.sampling.sampler import Sampler
from workers.sampling.state import RequestSamplingState, make_sampling_state

torch.set_num_threads(1)

VOCAB = 50


def make_logits(num_reqs: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_reqs, vocab, generator=generator) * 3.0


def state(output: list[int] | None = None, prompt: list[int] | None = None, eos: int | None = None,
          **params: object) -> RequestSamplingState:
    sampling_params = SamplingParams(**params)  # type: ignore[arg-type]
    return make_sampling_state(sampling_params, prompt or [], output or [], eos, "cpu")


# --------------------------------------------------------------------------- references (one row at a time)


def ref_penalties(row: torch.Tensor, st: RequestSamplingState) -> torch.Tensor:
    out = row.clone()
    p = st.params
    for token_id in set(st.prompt_token_ids) | set(st.output_token_ids):
        value = out[token_id].item()
        out[token_id] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
    for token_id in set(st.output_token_ids):
        count = st.output_token_ids.count(token_id)
        out[token_id] -= p.frequency_penalty * count + p.presence_penalty
    return out


def ref_filtered_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Softmax of the row after temperature, top-k, top-p and min-p, written the obvious way."""
    logits = (row / p.temperature).tolist()
    keep = set(range(len(logits)))
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    if p.top_k > 0:
        kth = logits[order[p.top_k - 1]]
        keep = {i for i in keep if logits[i] >= kth}
    if p.top_p < 1.0:
        z = sum(math.exp(logits[i]) for i in keep)
        mass, nucleus = 0.0, set[int]()
        for i in order:
            if i not in keep:
                continue
            if mass >= p.top_p and nucleus:
                break
            nucleus.add(i)
            mass += math.exp(logits[i]) / z
        keep = nucleus
    if p.min_p > 0.0:
        z = sum(math.exp(logits[i]) for i in keep)
        top = max(math.exp(logits[i]) / z for i in keep)
        keep = {i for i in keep if math.exp(logits[i]) / z >= p.min_p * top}
    masked = torch.full((len(logits),), float("-inf"))
    for i in keep:
        masked[i] = logits[i]
    return torch.softmax(masked, dim=-1)


def support(probs: torch.Tensor) -> set[int]:
    return set(torch.nonzero(probs > 0).flatten().tolist())


# --------------------------------------------------------------------------- greedy and transforms


def test_greedy_is_argmax_and_does_not_modify_logits() -> None:
    logits = make_logits(6)
    before = logits.clone()
    out = Sampler().sample(logits, [state(temperature=0.0) for _ in range(6)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6
    assert torch.equal(logits, before)


def test_top_k_one_equals_greedy() -> None:
    logits = make_logits(8, seed=1)
    out = Sampler().sample(logits, [state(temperature=1.3, top_k=1) for _ in range(8)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_logit_bias_then_greedy() -> None:
    logits = make_logits(3, seed=2)
    biases = [{7: 100.0}, {int(logits[1].argmax()): -1000.0}, {}]
    out = Sampler().sample(logits, [state(temperature=0.0, logit_bias=b) for b in biases])
    expected = logits.clone()
    expected[0, 7] += 100.0
    expected[1, logits[1].argmax()] -= 1000.0
    assert out.token_ids == expected.argmax(-1).tolist()
    assert out.token_ids[0] == 7


def test_penalties_match_reference() -> None:
    logits = make_logits(4, seed=3)
    states = [
        state(temperature=0.0, repetition_penalty=1.7, prompt=[1, 2, 3, 40], output=[5, 5, 6]),
        state(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.7, prompt=[9], output=[1, 1, 1, 8]),
        state(temperature=0.0, repetition_penalty=0.6, presence_penalty=-0.5, frequency_penalty=2.0,
              prompt=[0, 0, 11], output=[11, 12, 12]),
        state(temperature=0.0, prompt=[1, 2], output=[3]),  # no penalties: untouched
    ]
    from workers.sampling import sampler as sampler_module

    processed = logits.clone()
    sampler_module._apply_penalties(processed, states)
    for row, st in enumerate(states):
        torch.testing.assert_close(processed[row], ref_penalties(logits[row], st))
    assert torch.equal(processed[3], logits[3])


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=0.7, top_k=5),
        dict(temperature=1.0, top_p=0.6),
        dict(temperature=1.5, min_p=0.2),
        dict(temperature=0.9, top_k=10, top_p=0.8, min_p=0.05),
    ],
)
def test_filters_match_reference_support(params: dict[str, object]) -> None:
    """Tokens the sampler can draw are exactly the reference's support, whatever else is in the batch."""
    from workers.sampling import sampler as sampler_module

    logits = make_logits(5, seed=4)
    all_params = [SamplingParams(**params)] * 4 + [SamplingParams(temperature=1.0)]  # type: ignore[arg-type]
    processed = logits.clone() / torch.tensor([p.temperature for p in all_params])[:, None]
    sampler_module._apply_top_k_top_p(processed, all_params)
    sampler_module._apply_min_p(processed, all_params)
    for row in range(4):
        probs = torch.softmax(processed[row], dim=-1)
        expected = ref_filtered_probs(logits[row], all_params[row])
        assert support(probs) == support(expected)
        torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(processed[4], logits[4])  # an unfiltered row stays exact


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    logits = torch.zeros(3, VOCAB)
    logits[:, 2] = 50.0  # eos would win
    logits[:, 3] = 40.0  # then the stop id
    states = [
        state(temperature=0.0, eos=2, min_tokens=2, stop_token_ids=[3], output=[10]),
        state(temperature=0.0, eos=2, min_tokens=2, stop_token_ids=[3], output=[10, 11]),  # reached
        state(temperature=0.0, eos=2, min_tokens=5, output=[]),
    ]
    out = Sampler().sample(logits, states)
    assert out.token_ids[0] not in (2, 3)
    assert out.token_ids[1] == 2
    assert out.token_ids[2] == 3


def test_mixed_batch_greedy_rows_stay_greedy() -> None:
    logits = make_logits(6, seed=5)
    states = [state(temperature=0.0) if i % 2 else state(temperature=1.0, seed=i) for i in range(6)]
    out = Sampler().sample(logits, states)
    for row in (1, 3, 5):
        assert out.token_ids[row] == int(logits[row].argmax())


# --------------------------------------------------------------------------- randomness


def _run_seeded(batch_logits: list[torch.Tensor], position: int, num_others: int, seed: int) -> list[int]:
    """Sample 5 steps of a seeded request placed at `position` among unseeded/other-seeded requests."""
    sampler = Sampler()
    target = state(temperature=1.0, top_p=0.95, seed=seed)
    others = [state(temperature=0.8, seed=100 + i if i % 2 else None) for i in range(num_others)]
    tokens = []
    for step_logits in batch_logits:
        states = others[:position] + [target] + others[position:]
        rows = [make_logits(1, seed=1000 + i + position)[0] for i in range(num_others)]
        logits = torch.stack(rows[:position] + [step_logits] + rows[position:])
        token = sampler.sample(logits, states).token_ids[position]
        target.output_token_ids.append(token)
        tokens.append(token)
    return tokens


def test_seed_reproducible_regardless_of_batch() -> None:
    steps = [make_logits(1, seed=50 + i)[0] * 0.3 for i in range(5)]  # flat-ish: many plausible tokens
    alone = _run_seeded(steps, position=0, num_others=0, seed=1234)
    assert _run_seeded(steps, position=0, num_others=0, seed=1234) == alone
    assert _run_seeded(steps, position=2, num_others=4, seed=1234) == alone
    assert _run_seeded(steps, position=3, num_others=3, seed=1234) == alone
    others = [_run_seeded(steps, position=0, num_others=0, seed=s) for s in range(5)]
    assert any(tokens != alone for tokens in others)


def test_sampled_distribution_matches_softmax() -> None:
    vocab, draws = 8, 20000
    row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    logits = row.expand(draws, vocab).contiguous()  # one batch of many identical unseeded requests
    torch.manual_seed(0)
    params = SamplingParams(temperature=0.9)
    states = [RequestSamplingState(params, [], [], None) for _ in range(draws)]
    counts = torch.bincount(torch.tensor(Sampler().sample(logits, states).token_ids), minlength=vocab).float()
    expected = torch.softmax(row / 0.9, dim=-1) * draws
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 40.0, (counts, expected)  # 7 degrees of freedom: p(chi2 > 40) ~ 1e-6


def test_seeded_distribution_matches_softmax() -> None:
    vocab, draws = 4, 3000
    row = torch.tensor([1.0, 0.0, -0.5, 0.5])
    st = state(temperature=1.0, seed=7)
    sampler = Sampler()
    tokens = [sampler.sample(row[None], [st]).token_ids[0] for _ in range(draws)]
    counts = torch.bincount(torch.tensor(tokens), minlength=vocab).float()
    expected = torch.softmax(row, dim=-1) * draws
    assert float(((counts - expected) ** 2 / expected).sum()) < 30.0


# --------------------------------------------------------------------------- logprobs


def test_logprobs_from_raw_logits() -> None:
    logits = make_logits(3, seed=6)
    states = [
        state(temperature=0.0, logprobs=3, repetition_penalty=2.0, prompt=[0, 1, 2]),
        state(temperature=1.0, seed=3, logprobs=0),
        state(temperature=0.0),  # no logprobs requested
    ]
    out = Sampler().sample(logits, states)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[2] is None
    for row in (0, 1):
        entries = out.logprobs[row]
        assert entries is not None and len(entries) == 1
        entry = entries[0]
        token = out.token_ids[row]
        assert entry.logprob == pytest.approx(raw[row, token].item(), abs=1e-6)
        assert entry.rank == int((raw[row] > raw[row, token]).sum()) + 1
    top = out.logprobs[0][0]  # type: ignore[index]
    values, ids = raw[0].topk(3)
    assert top.top_token_ids == ids.tolist()
    assert top.top_logprobs == pytest.approx(values.tolist(), abs=1e-6)
    assert out.logprobs[1][0].top_token_ids == []  # type: ignore[index]


def test_greedy_fast_path_logprobs_rank_one() -> None:
    logits = make_logits(2, seed=7)
    out = Sampler().sample(logits, [state(temperature=0.0, logprobs=2), state(temperature=0.0, logprobs=5)])
    assert [entries[0].rank for entries in out.logprobs] == [1, 1]  # type: ignore[index]
    assert out.logprobs[1][0].top_token_ids[0] == out.token_ids[1]  # type: ignore[index]
    assert len(out.logprobs[1][0].top_token_ids) == 5  # type: ignore[index]
