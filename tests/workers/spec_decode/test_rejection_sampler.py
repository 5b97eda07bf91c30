"""Rejection sampler: greedy equals plain greedy decoding; random sampling is exact (chi-square against p);
seeds reproduce; the acceptance counters."""
from __future__ import annotations

import pytest
import torch

from workers.spec_decode.rejection_sampler import RejectionSampler
from workers.spec_decode.stats import SpecDecodingStats

torch.set_num_threads(1)

VOCAB = 20
SAMPLER = RejectionSampler()
# 0.999 quantiles of the chi-square distribution by degrees of freedom (scipy is not installed;
# scipy.stats.chi2.ppf(0.999, df) gives these). With fixed seeds the tests are deterministic; the quantile
# keeps them meaningful: a biased sampler at 20,000 draws lands far above it.
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}


def make_logits(num_rows: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, VOCAB, generator=generator) * 3.0  # [num_rows, vocab]


def greedy_reference(logits: torch.Tensor, drafts: list[list[int]]) -> list[list[int]]:
    """Plain greedy decoding over the same rows, one position at a time: emit argmax; continue only while
    the emitted token is the one the target already saw (the draft)."""
    emitted: list[list[int]] = []
    row = 0
    for draft in drafts:
        tokens: list[int] = []
        for position in range(len(draft) + 1):
            token = int(logits[row + position].argmax())
            tokens.append(token)
            if position == len(draft) or token != draft[position]:
                break
        emitted.append(tokens)
        row += len(draft) + 1
    return emitted


def argmax_drafts(logits: torch.Tensor, num_draft: list[int], wrong_at: list[int | None]) -> list[list[int]]:
    """Drafts equal to the target's argmax, except a wrong token at `wrong_at[i]` (None: all right)."""
    drafts: list[list[int]] = []
    row = 0
    for k, wrong in zip(num_draft, wrong_at):
        draft = [int(logits[row + j].argmax()) for j in range(k)]
        if wrong is not None:
            draft[wrong] = (draft[wrong] + 1) % VOCAB
        drafts.append(draft)
        row += k + 1
    return drafts


# --------------------------------------------------------------------------- greedy


@pytest.mark.parametrize(("k", "wrong_at", "num_accepted"), [(3, None, 3), (3, 0, 0), (3, 1, 1), (3, 2, 2),
                                                             (0, None, 0)])
def test_greedy_single_request(k: int, wrong_at: int | None, num_accepted: int) -> None:
    logits = make_logits(k + 1)
    drafts = argmax_drafts(logits, [k], [wrong_at])
    out = SAMPLER.sample(logits, drafts, [True])
    assert out.token_ids == greedy_reference(logits, drafts)
    assert out.num_accepted_tokens == [num_accepted]
    assert len(out.token_ids[0]) == num_accepted + 1
    if wrong_at is None:  # all accepted: the bonus token is the argmax of the last row
        assert out.token_ids[0][-1] == int(logits[k].argmax())


def test_greedy_mixed_batch_and_probs_or_logits_agree() -> None:
    num_draft = [3, 0, 1, 4, 2, 0]
    wrong_at: list[int | None] = [None, None, 0, 2, None, None]
    logits = make_logits(sum(num_draft) + len(num_draft), seed=1)
    before = logits.clone()
    drafts = argmax_drafts(logits, num_draft, wrong_at)
    out = SAMPLER.sample(logits, drafts, [True] * len(drafts))
    assert out.token_ids == greedy_reference(logits, drafts)
    assert out.num_accepted_tokens == [3, 0, 0, 2, 2, 0]
    assert torch.equal(logits, before)
    assert SAMPLER.sample(torch.softmax(logits, dim=-1), drafts, [True] * len(drafts)) == out


def test_greedy_requests_stay_greedy_in_a_mixed_batch() -> None:
    num_draft = [2, 3, 1]
    logits = make_logits(sum(num_draft) + 3, seed=2)
    drafts = argmax_drafts(logits, num_draft, [None, 1, None])
    probs = torch.softmax(logits, dim=-1)
    seeded = torch.Generator().manual_seed(5)
    state = seeded.get_state()
    out = SAMPLER.sample(probs, drafts, [True, False, True], generator=torch.Generator().manual_seed(0),
                         request_generators=[seeded, None, None])
    reference = greedy_reference(logits, drafts)
    assert out.token_ids[0] == reference[0] and out.token_ids[2] == reference[2]
    assert torch.equal(seeded.get_state(), state)  # a greedy request never draws from its generator


def test_empty_batch() -> None:
    out = SAMPLER.sample(torch.zeros(0, VOCAB), [], [])
    assert out.token_ids == [] and out.num_accepted_tokens == []


# --------------------------------------------------------------------------- random: exactness

NUM_SAMPLES = 20_000
P = torch.tensor([[0.10, 0.40, 0.25, 0.25, 0.00],  # position 1 (a zero, as top-k would leave)
                  [0.30, 0.05, 0.15, 0.20, 0.30],  # position 2
                  [0.20, 0.20, 0.20, 0.20, 0.20]])  # bonus position
Q = torch.tensor([[0.30, 0.20, 0.10, 0.10, 0.30],  # puts mass on p's zero: the residual must remove it
                  [0.10, 0.50, 0.10, 0.20, 0.10]])


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Statistic and degrees of freedom of `tokens` [n] against `probs` [vocab]; zero cells must stay empty."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    support = probs > 0
    assert counts[~support].sum() == 0, counts
    expected = probs[support].double() * tokens.numel()
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def assert_distributed_as(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    statistic, dof = chi_square(tokens, probs)
    assert statistic < CHI2_999[dof], (statistic, dof, torch.bincount(tokens, minlength=probs.numel()))


def sample_many(drafts: list[list[int]], draft_probs: torch.Tensor | None,
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NUM_SAMPLES independent requests with the same target rows P: [n, 3] emitted (-1 padded), [n] accepted."""
    target = P.repeat(NUM_SAMPLES, 1)  # [n * 3, vocab]
    out = SAMPLER.sample(target, drafts, [False] * NUM_SAMPLES, draft_probs=draft_probs,
                         generator=torch.Generator().manual_seed(seed))
    emitted = torch.tensor([tokens + [-1] * (3 - len(tokens)) for tokens in out.token_ids])
    return emitted, torch.tensor(out.num_accepted_tokens)


def assert_exact(emitted: torch.Tensor, num_accepted: torch.Tensor) -> None:
    assert_distributed_as(emitted[:, 0], P[0])
    first_accepted = num_accepted >= 1
    assert_distributed_as(emitted[first_accepted, 1], P[1])
    both_accepted = num_accepted == 2
    assert_distributed_as(emitted[both_accepted, 2], P[2])  # the bonus token


def assert_acceptance_rate(accepted: torch.Tensor, expected: float) -> None:
    rate = float(accepted.float().mean())
    sigma = (expected * (1 - expected) / accepted.numel()) ** 0.5
    assert abs(rate - expected) < 5 * sigma, (rate, expected)


def test_one_hot_drafts_are_exact() -> None:
    drafts = [[1, 4]] * NUM_SAMPLES  # deterministic proposals, as ngram makes
    emitted, num_accepted = sample_many(drafts, None, seed=0)
    assert_exact(emitted, num_accepted)
    assert_acceptance_rate(num_accepted >= 1, float(P[0, 1]))  # accept x with probability p(x)
    assert_acceptance_rate(num_accepted[num_accepted >= 1] == 2, float(P[1, 4]))


def test_sampled_drafts_are_exact() -> None:
    generator = torch.Generator().manual_seed(1)
    first = torch.multinomial(Q[0], NUM_SAMPLES, replacement=True, generator=generator)  # [n]
    second = torch.multinomial(Q[1], NUM_SAMPLES, replacement=True, generator=generator)  # [n]
    drafts = torch.stack([first, second], dim=1).tolist()
    emitted, num_accepted = sample_many(drafts, Q.repeat(NUM_SAMPLES, 1), seed=2)
    assert_exact(emitted, num_accepted)
    # P(accept) = sum_x q(x) min(1, p(x)/q(x)) = sum_x min(p(x), q(x))
    assert_acceptance_rate(num_accepted >= 1, float(torch.minimum(P[0], Q[0]).sum()))


def test_seeded_requests_are_exact() -> None:
    # Each request draws from its own generator (a separate code path); fewer samples keep the loop short.
    num_samples = 3_000
    generators: list[torch.Generator | None] = [torch.Generator().manual_seed(seed) for seed in range(num_samples)]
    out = SAMPLER.sample(P.repeat(num_samples, 1), [[1, 4]] * num_samples, [False] * num_samples,
                         request_generators=generators)
    first = torch.tensor([tokens[0] for tokens in out.token_ids])
    assert_distributed_as(first, P[0])


def test_identical_draft_and_target_always_accept() -> None:
    target = P.repeat(200, 1)
    drafts = torch.stack([torch.multinomial(P[j], 200, replacement=True) for j in range(2)], dim=1).tolist()
    out = SAMPLER.sample(target, drafts, [False] * 200, draft_probs=P[:2].repeat(200, 1))
    assert out.num_accepted_tokens == [2] * 200


# --------------------------------------------------------------------------- random: reproducibility


def test_shared_generator_reproduces() -> None:
    num_draft = [2, 0, 3]
    probs = torch.softmax(make_logits(sum(num_draft) + 3, seed=3) / 4.0, dim=-1)
    drafts = argmax_drafts(probs, num_draft, [None, None, 1])
    outs = [SAMPLER.sample(probs, drafts, [False] * 3, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert outs[0] == outs[1]


def test_seeded_request_ignores_the_rest_of_the_batch() -> None:
    probs = torch.softmax(make_logits(12, seed=4) / 4.0, dim=-1)  # flat enough that outcomes vary
    alone_rows, alone_draft = probs[:4], [[1, 2, 3]]
    runs = []
    for extra in ([], [[5], [6, 7, 8, 9, 10]]):
        rows = torch.cat([alone_rows, probs[4:4 + sum(len(d) + 1 for d in extra)]])
        generators = [torch.Generator().manual_seed(11)] + [None] * len(extra)
        out = SAMPLER.sample(rows, alone_draft + extra, [False] * (1 + len(extra)),
                             generator=torch.Generator().manual_seed(len(extra)), request_generators=generators)
        runs.append((out.token_ids[0], out.num_accepted_tokens[0]))
    assert runs[0] == runs[1]


# --------------------------------------------------------------------------- metrics


def test_stats_count_like_vllm() -> None:
    stats = SpecDecodingStats(num_spec_tokens=3)
    stats.observe_batch([3, 0, 2, 3], [2, 0, 2, 0])
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (3, 8, 4)
    assert stats.num_accepted_tokens_per_pos == [2, 2, 0]


def test_sampler_counts_feed_the_stats() -> None:
    num_draft = [3, 0, 1, 4]
    logits = make_logits(sum(num_draft) + 4, seed=5)
    out = SAMPLER.sample(logits, argmax_drafts(logits, num_draft, [None, None, 0, 2]), [True] * 4)
    stats = SpecDecodingStats(num_spec_tokens=4)
    stats.observe_batch(num_draft, out.num_accepted_tokens)
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (3, 8, 5)
    assert stats.num_accepted_tokens_per_pos == [2, 2, 1, 0]
