"""Sampling on rank 0: one call turns a batch's last-position logits into one token per request.

Pipeline (each stage runs only when some row of the batch needs it; rows that do not are left exact):

    raw logits ──▶ logprobs (log_softmax of the RAW logits, like vLLM's default `raw_logprobs`)
        │
        ├─▶ logit_bias ─▶ allowed_token_ids ─▶ min_tokens (mask EOS / stop ids) + bad words ─▶ repetition
        │   ─▶ presence/frequency penalties ─▶ logits processors named in vllm_xargs (workers/sampling/logits_processors.py)
        │
        ├─▶ greedy rows: argmax
        └─▶ sampled rows: / temperature ─▶ top_k ─▶ top_p ─▶ min_p ─▶ softmax ─▶ exponential race

The exponential race picks argmax(p_i / E_i) with E_i ~ Exponential(1), which draws token i with
probability p_i. Seeded requests draw E from their own generator (one [vocab] draw per step), so a seed
gives the same tokens whatever else shares the batch; unseeded rows share one batch-wide draw.

Per-row parameters become [num_reqs] tensors built once per call from Python lists; tensor work is
batched, and the only device-to-host copies happen at the end.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine_core.protocol import SamplingParams, TokenLogprobs
from workers.sampling.logits_processors import (apply_allowed_token_ids, apply_logits_processors, bad_word_bans,
                                                needs_request_processing)
from workers.sampling.state import RequestSamplingState

# Temperatures below this are greedy (dividing by them would overflow).
_GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per request, in batch order
    logprobs: list[list[TokenLogprobs] | None]  # per request: None unless params.logprobs is set
    # row -> why its logits processors failed (workers/sampling/logits_processors.py); such a row's token is meaningless
    errors: dict[int, str] = field(default_factory=dict)


def _is_greedy(params: SamplingParams) -> bool:
    return params.temperature < _GREEDY_TEMPERATURE


def _has_penalties(params: SamplingParams) -> bool:
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)


def _min_tokens_ids(state: RequestSamplingState) -> list[int]:
    """Token ids to forbid this step because the request has not yet produced `min_tokens` tokens."""
    params = state.params
    if len(state.output_token_ids) >= params.min_tokens:
        return []
    ids = list(params.stop_token_ids)
    if state.eos_token_id is not None and not params.ignore_eos:
        ids.append(state.eos_token_id)
    return ids


class Sampler:
    """Stateless: everything per request comes in through `RequestSamplingState`."""

    def sample(self, logits: torch.Tensor, states: list[RequestSamplingState]) -> SamplerOutput:
        """Pick one token per row of `logits` [num_reqs, vocab]; row i belongs to `states[i]`.

        Does not modify `logits`. Advances the generators of seeded, non-greedy requests.
        """
        assert logits.dim() == 2 and logits.shape[0] == len(states), (logits.shape, len(states))
        params = [state.params for state in states]
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        # [num_logprob_reqs, vocab]
        raw_logprobs = torch.log_softmax(logits[logprob_rows].float(), dim=-1) if logprob_rows else None

        # min_tokens (EOS / stop ids) and bad words (the last token of a sequence the output is completing)
        min_tokens_ids = [_min_tokens_ids(state) + bad_word_bans(state) for state in states]
        plain_greedy = all(_is_greedy(p) and not _has_penalties(p) and not p.logit_bias for p in params)
        errors: dict[int, str] = {}
        if plain_greedy and not any(min_tokens_ids) and not any(map(needs_request_processing, states)):
            token_ids = logits.argmax(dim=-1)  # [num_reqs]
        else:
            processed = logits.to(torch.float32, copy=True)  # [num_reqs, vocab]
            _apply_logit_bias(processed, params)
            apply_allowed_token_ids(processed, states)
            _apply_banned_tokens(processed, min_tokens_ids)
            _apply_penalties(processed, states)
            errors = apply_logits_processors(processed, states)  # user processors selected via vllm_xargs
            token_ids = _sample_processed(processed, states)

        token_id_list: list[int] = token_ids.tolist()
        logprobs: list[list[TokenLogprobs] | None] = [None] * len(states)
        if raw_logprobs is not None:
            chosen = token_ids[logprob_rows]  # [num_logprob_reqs]
            for row, entry in zip(logprob_rows, _gather_logprobs(raw_logprobs, chosen, params, logprob_rows)):
                logprobs[row] = [entry]
        return SamplerOutput(token_ids=token_id_list, logprobs=logprobs, errors=errors)


# --------------------------------------------------------------------------- logit processors


def _apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> None:
    """Add each request's `logit_bias[token_id]` in place; ids outside the vocabulary are ignored."""
    vocab_size = logits.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for row, p in enumerate(params):
        for token_id, bias in (p.logit_bias or {}).items():
            if 0 <= int(token_id) < vocab_size:
                rows.append(row)
                cols.append(int(token_id))
                values.append(float(bias))
    if rows:
        index = _index_tensors(rows, cols, logits.device)
        logits.index_put_(index, torch.tensor(values, device=logits.device), accumulate=True)


def _apply_banned_tokens(logits: torch.Tensor, banned_ids: list[list[int]]) -> None:
    """Set `logits[row, banned_ids[row]]` to -inf in place (min_tokens: EOS and stop ids)."""
    vocab_size = logits.shape[1]
    rows = [row for row, ids in enumerate(banned_ids) for token_id in ids if 0 <= token_id < vocab_size]
    cols = [token_id for ids in banned_ids for token_id in ids if 0 <= token_id < vocab_size]
    if rows:
        neg_inf = torch.tensor(float("-inf"), device=logits.device)
        logits.index_put_(_index_tensors(rows, cols, logits.device), neg_inf)


def _index_tensors(rows: list[int], cols: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(cols, dtype=torch.long, device=device))


def _apply_penalties(logits: torch.Tensor, states: list[RequestSamplingState]) -> None:
    """Repetition (HF/vLLM: over prompt + output), presence and frequency (OpenAI: output only), in place."""
    if not any(_has_penalties(state.params) for state in states):
        return
    num_reqs, vocab_size = logits.shape
    device = logits.device
    # Rows without penalties contribute no tokens, so their counts stay zero and their logits untouched.
    output_counts = _token_counts(
        [s.output_token_ids if _has_penalties(s.params) else [] for s in states], vocab_size, device)
    if any(s.params.repetition_penalty != 1.0 for s in states):
        repetition = torch.tensor([s.params.repetition_penalty for s in states], device=device)  # [num_reqs]
        seen = _prompt_mask(states, vocab_size, device) | (output_counts > 0)  # [num_reqs, vocab]
        penalty = torch.where(seen, repetition[:, None], torch.ones_like(logits))
        logits.copy_(torch.where(logits > 0, logits / penalty, logits * penalty))
    presence = torch.tensor([s.params.presence_penalty for s in states], device=device)  # [num_reqs]
    frequency = torch.tensor([s.params.frequency_penalty for s in states], device=device)  # [num_reqs]
    logits -= frequency[:, None] * output_counts
    logits -= presence[:, None] * (output_counts > 0).float()


def _token_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[num_reqs, vocab] float counts of each token id in each row's list (ids outside the vocab ignored)."""
    rows = [row for row, ids in enumerate(token_lists) for _ in ids]
    cols = [token_id for ids in token_lists for token_id in ids]
    # One spare column absorbs out-of-range ids; it is dropped below.
    counts = torch.zeros(len(token_lists), vocab_size + 1, device=device)
    if rows:
        row_index, col_index = _index_tensors(rows, cols, device)
        col_index = torch.where((col_index >= 0) & (col_index < vocab_size), col_index, vocab_size)
        counts.index_put_((row_index, col_index), torch.ones(len(rows), device=device), accumulate=True)
    return counts[:, :vocab_size]


def _prompt_mask(states: list[RequestSamplingState], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[num_reqs, vocab] bool: token occurs in the prompt of a row with a repetition penalty."""
    rows = [row for row, s in enumerate(states) if s.params.repetition_penalty != 1.0 and s.prompt_token_ids]
    mask = torch.zeros(len(states), vocab_size + 1, dtype=torch.bool, device=device)
    if not rows:
        return mask[:, :vocab_size]
    prompts = [_cached_prompt_ids(states[row], device) for row in rows]
    lengths = torch.tensor([len(ids) for ids in prompts], device=device)
    row_index = torch.repeat_interleave(torch.tensor(rows, device=device), lengths)  # [total_prompt_tokens]
    col_index = torch.cat(prompts)  # [total_prompt_tokens]
    col_index = torch.where((col_index >= 0) & (col_index < vocab_size), col_index, vocab_size)
    mask[row_index, col_index] = True
    return mask[:, :vocab_size]


def _cached_prompt_ids(state: RequestSamplingState, device: torch.device) -> torch.Tensor:
    """The prompt as a long tensor on `device`, made once per request (mutates `state.prompt_ids_tensor`)."""
    if state.prompt_ids_tensor is None or state.prompt_ids_tensor.device != torch.device(device):
        state.prompt_ids_tensor = torch.tensor(state.prompt_token_ids, dtype=torch.long, device=device)
    return state.prompt_ids_tensor


# --------------------------------------------------------------------------- sampling


def _sample_processed(logits: torch.Tensor, states: list[RequestSamplingState]) -> torch.Tensor:
    """[num_reqs] token ids: argmax for greedy rows, temperature/top-k/top-p/min-p sampling for the rest."""
    params = [state.params for state in states]
    greedy = [_is_greedy(p) for p in params]
    greedy_ids = logits.argmax(dim=-1)  # [num_reqs]
    if all(greedy):
        return greedy_ids
    device = logits.device
    temperature = torch.tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)], device=device)
    logits /= temperature[:, None]
    _apply_top_k_top_p(logits, params)
    _apply_min_p(logits, params)
    probs = torch.softmax(logits, dim=-1)  # [num_reqs, vocab]
    sampled_ids = _exponential_race(probs, states, greedy)
    return torch.where(torch.tensor(greedy, device=device), greedy_ids, sampled_ids)


def _apply_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> None:
    """Mask to -inf, in place, all but each row's `top_k` largest logits, then outside its `top_p` nucleus.

    The nucleus keeps the smallest set of most likely tokens whose probability reaches `top_p` (the most
    likely token always stays). Ties at the k-th value are all kept.
    """
    vocab_size = logits.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    top_p = [p.top_p if p.top_p < 1.0 else 1.0 for p in params]
    use_k, use_p = any(k < vocab_size for k in top_k), any(p < 1.0 for p in top_p)
    if not (use_k or use_p):
        return
    device = logits.device
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # [num_reqs, vocab] each
    if use_k:
        k_index = torch.tensor(top_k, device=device)[:, None] - 1  # [num_reqs, 1]
        kth_value = sorted_logits.gather(1, k_index)  # [num_reqs, 1]
        sorted_logits.masked_fill_(sorted_logits < kth_value, float("-inf"))
    if use_p:
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # probability of better tokens
        p_limit = torch.tensor(top_p, device=device)[:, None]  # [num_reqs, 1]
        # Rows with top_p == 1 skip the test: rounding in cumsum must not cut their tail.
        drop = (mass_before >= p_limit) & (p_limit < 1.0)
        drop[:, 0] = False
        sorted_logits.masked_fill_(drop, float("-inf"))
    logits.scatter_(1, sorted_ids, sorted_logits)


def _apply_min_p(logits: torch.Tensor, params: list[SamplingParams]) -> None:
    """Mask to -inf, in place, tokens whose probability is below `min_p` times the row's top probability."""
    if not any(p.min_p > 0.0 for p in params):
        return
    min_p = torch.tensor([p.min_p for p in params], device=logits.device)[:, None]  # [num_reqs, 1]
    probs = torch.softmax(logits, dim=-1)  # [num_reqs, vocab]
    threshold = min_p * probs.max(dim=-1, keepdim=True).values  # [num_reqs, 1]
    logits.masked_fill_(probs < threshold, float("-inf"))


def _exponential_race(probs: torch.Tensor, states: list[RequestSamplingState], greedy: list[bool]) -> torch.Tensor:
    """[num_reqs] argmax(probs / E), E ~ Exponential(1): a draw from each row's distribution.

    Seeded rows draw E from their own generator; all other rows share one batch-wide draw.
    """
    noise = torch.empty_like(probs).exponential_()  # [num_reqs, vocab]
    for row, state in enumerate(states):
        generator = state.generator
        if generator is None or greedy[row]:
            continue
        row_noise = torch.empty(probs.shape[1], device=generator.device).exponential_(generator=generator)
        noise[row] = row_noise.to(probs.device)
    # E can be 0 in float32; clamping keeps a zero-probability token at 0 instead of 0/0 = NaN.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


# --------------------------------------------------------------------------- logprobs


def _gather_logprobs(
    logprobs: torch.Tensor, chosen_ids: torch.Tensor, params: list[SamplingParams], rows: list[int]
) -> list[TokenLogprobs]:
    """One `TokenLogprobs` per row of `logprobs` [n, vocab] (raw distribution), for `chosen_ids` [n].

    Rank is 1 + the number of tokens strictly more likely than the chosen one.
    """
    chosen_logprobs = logprobs.gather(1, chosen_ids[:, None])  # [n, 1]
    ranks = (logprobs > chosen_logprobs).sum(dim=-1) + 1  # [n]
    num_top = [params[row].logprobs or 0 for row in rows]
    max_top = min(max(num_top), logprobs.shape[1])
    top_values, top_ids = logprobs.topk(max_top, dim=-1) if max_top else (None, None)  # [n, max_top] each
    chosen_list = chosen_logprobs[:, 0].tolist()
    rank_list = ranks.tolist()
    top_value_list = top_values.tolist() if top_values is not None else [[] for _ in rows]
    top_id_list = top_ids.tolist() if top_ids is not None else [[] for _ in rows]
    return [
        TokenLogprobs(logprob=chosen_list[i], rank=rank_list[i],
                      top_token_ids=top_id_list[i][: num_top[i]], top_logprobs=top_value_list[i][: num_top[i]])
        for i in range(len(rows))
    ]
