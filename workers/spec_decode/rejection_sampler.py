"""Verify draft tokens against the target model: keep the longest acceptable prefix, then emit one target token.

One forward pass of the target over [last sampled token, draft_1 .. draft_k] gives k + 1 distributions per
request; row j scores the token after draft_j (row 0: after the last sampled token). Requests are flattened:

    target_probs rows:  | r0: p0 p1 p2 p3 | r1: p0 | r2: p0 p1 |      k = [3, 0, 1], sum(k + 1) = 7 rows
    draft_probs rows:   | r0: q1 q2 q3    | r1:    | r2: q1    |      sum(k) = 4 rows (or None)

Contract: `target_probs` is the distribution the request samples from AFTER all processing (penalties,
temperature, top-k/top-p/min-p, masks): the caller applies them exactly as for a normal step. Speculative
sampling is exact only for the distribution it is given, so nothing here re-weights. For greedy requests only
each row's argmax is read, so their rows may hold processed logits instead of probabilities.

Greedy requests accept draft_j while it equals argmax(p_{j-1}); the first mismatch emits that argmax instead,
and when all k match the bonus token argmax(p_k) follows: exactly the tokens plain greedy decoding would give.

Random requests run speculative sampling (Leviathan et al. 2023; Chen et al. 2023): accept x = draft_j with
probability min(1, p(x) / q(x)); at the first rejection emit a draw from normalize(max(0, p - q)); when all k
are accepted emit a draw from p_k. Each emitted token is then distributed exactly as p. With `draft_probs`
None the drafts are deterministic (ngram), q is one-hot on x, and this becomes: accept with probability p(x),
else draw from p with x removed.

Everything is batched over padded [num_reqs, max_k] tensors except the per-request generators of seeded
requests, which draw their own numbers so a seed gives the same tokens whatever shares the batch (as in
workers/sampling/sampler.py). Only one [num_reqs, vocab] slab is sampled from: the row where each request
stops; the [sum(k + 1), vocab] input is read by gathers and one argmax, never copied.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class RejectionSamplerOutput:
    token_ids: list[list[int]]  # per request: its accepted drafts, then one target token (1 .. k_i + 1 tokens)
    num_accepted_tokens: list[int]  # per request: accepted draft tokens (0 .. k_i), for the acceptance metrics


@dataclass
class _Layout:
    """Where each request's drafts and target rows sit, padded to the batch's longest draft."""

    num_draft_list: list[int]  # k_i, host-side for loops over seeded requests
    num_draft_tokens: torch.Tensor  # [num_reqs] long: k_i
    target_offsets: torch.Tensor  # [num_reqs] long: first target_probs row of each request
    draft_offsets: torch.Tensor  # [num_reqs] long: first draft_probs row of each request
    draft_ids: torch.Tensor  # [num_reqs, max_k] long, 0 where padded
    valid: torch.Tensor  # [num_reqs, max_k] bool: slot holds a real draft

    @classmethod
    def build(cls, draft_token_ids: Sequence[Sequence[int]], device: torch.device) -> _Layout:
        num_draft_list = [len(ids) for ids in draft_token_ids]
        num_draft = torch.tensor(num_draft_list, dtype=torch.long, device=device)  # [num_reqs]
        draft_offsets = torch.cumsum(num_draft, 0) - num_draft  # [num_reqs]
        target_offsets = draft_offsets + torch.arange(len(num_draft_list), device=device)  # one extra row each
        max_k = max(num_draft_list, default=0)
        slots = torch.arange(max_k, device=device)  # [max_k]
        valid = slots[None, :] < num_draft[:, None]  # [num_reqs, max_k]
        flat = torch.tensor(list(itertools.chain.from_iterable(draft_token_ids)), dtype=torch.long, device=device)
        if flat.numel():
            index = torch.where(valid, draft_offsets[:, None] + slots, 0)  # [num_reqs, max_k]
            draft_ids = torch.where(valid, flat[index], 0)
        else:
            draft_ids = torch.zeros(len(num_draft_list), max_k, dtype=torch.long, device=device)
        return cls(num_draft_list, num_draft, target_offsets, draft_offsets, draft_ids, valid)

    def slot_rows(self, offsets: torch.Tensor) -> torch.Tensor:
        """[num_reqs, max_k] row of each draft slot counted from `offsets`; padded slots read row 0.

        Row 0 exists whenever there is a slot at all; a padded slot's offset may lie past the last row.
        """
        slots = torch.arange(self.valid.shape[1], device=offsets.device)
        return torch.where(self.valid, offsets[:, None] + slots, 0)


@dataclass
class _Step:
    """One `sample` call's inputs, bundled so the stages below read what they need."""

    target_probs: torch.Tensor  # [sum(k + 1), vocab]
    draft_probs: torch.Tensor | None  # [sum(k), vocab]
    layout: _Layout
    is_greedy: list[bool]  # [num_reqs]
    greedy: torch.Tensor  # [num_reqs] bool, is_greedy on the device
    target_argmax: torch.Tensor | None  # [sum(k + 1)]; None when no request is greedy
    generator: torch.Generator | None
    request_generators: Sequence[torch.Generator | None] | None


class RejectionSampler:
    """Stateless: everything per request comes in through the arguments of `sample`."""

    def sample(
        self,
        target_probs: torch.Tensor,
        draft_token_ids: Sequence[Sequence[int]],
        is_greedy: Sequence[bool],
        draft_probs: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        request_generators: Sequence[torch.Generator | None] | None = None,
    ) -> RejectionSamplerOutput:
        """Verify each request's drafts; emit its accepted prefix plus one token from the target.

        target_probs: [sum(k_i + 1), vocab], k_i = len(draft_token_ids[i]), rows as in the module docstring.
        draft_probs: [sum(k_i), vocab] the distributions the drafts were drawn from; None for one-hot drafts.
        is_greedy: per request, temperature 0. generator: the shared draw of unseeded random requests, on
        target_probs' device (None: torch's default generator). request_generators: per request, its own generator or None; advanced by
        k_i uniforms and one [vocab] draw per call for a random request, never for a greedy one.
        Reads its inputs without modifying them.
        """
        num_reqs = len(draft_token_ids)
        if num_reqs == 0:
            return RejectionSamplerOutput([], [])
        device = target_probs.device
        layout = _Layout.build(draft_token_ids, device)
        num_drafts_total = sum(layout.num_draft_list)
        assert target_probs.dim() == 2 and target_probs.shape[0] == num_drafts_total + num_reqs, target_probs.shape
        assert draft_probs is None or draft_probs.shape == (num_drafts_total, target_probs.shape[1])
        assert len(is_greedy) == num_reqs and (request_generators is None or len(request_generators) == num_reqs)
        # argmax runs over all rows only when some request needs it; it reads the input without copying it.
        target_argmax = target_probs.argmax(dim=-1) if any(is_greedy) else None
        step = _Step(target_probs, draft_probs, layout, list(is_greedy),
                     torch.tensor(list(is_greedy), dtype=torch.bool, device=device), target_argmax,
                     generator, request_generators)
        accepted = _accept(step)  # [num_reqs, max_k]
        # Leading run of accepted drafts: cumprod turns everything after the first rejection into 0.
        num_accepted = torch.cumprod(accepted.long(), dim=1).sum(dim=1)  # [num_reqs]
        final_ids = _final_tokens(step, num_accepted)  # [num_reqs]
        return _to_output(layout, num_accepted, final_ids)


def _accept(step: _Step) -> torch.Tensor:
    """[num_reqs, max_k] bool: each draft slot passes its own test (greedy match or the min(1, p/q) coin)."""
    layout = step.layout
    draft_ids = layout.draft_ids
    target_rows = layout.slot_rows(layout.target_offsets)  # [num_reqs, max_k]
    greedy_match = None if step.target_argmax is None else step.target_argmax[target_rows] == draft_ids
    if greedy_match is not None and all(step.is_greedy):
        return greedy_match & layout.valid
    target_p = step.target_probs[target_rows, draft_ids].float()  # [num_reqs, max_k]: p(x)
    if step.draft_probs is None:
        draft_q = torch.ones_like(target_p)  # one-hot drafts: q(x) = 1
    else:
        draft_q = step.draft_probs[layout.slot_rows(layout.draft_offsets), draft_ids].float()  # q(x)
    uniform = _uniforms(step)  # [num_reqs, max_k] in [0, 1)
    # u < p/q without dividing: q(x) = 0 (x could not have been drawn) then accepts, as min(1, p/0) = 1.
    accept = uniform * draft_q < target_p
    if greedy_match is not None:
        accept = torch.where(step.greedy[:, None], greedy_match, accept)
    return accept & layout.valid


def _final_tokens(step: _Step, num_accepted: torch.Tensor) -> torch.Tensor:
    """[num_reqs] the token each request emits after its accepted drafts.

    Recovered (after a rejection) or bonus (all accepted): both come from the target row where the request
    stopped, so one [num_random, vocab] gather serves both.
    """
    layout = step.layout
    final_rows = layout.target_offsets + num_accepted  # [num_reqs]
    final_ids = (step.target_argmax[final_rows] if step.target_argmax is not None
                 else torch.zeros_like(final_rows))  # [num_reqs]
    random_reqs = [i for i, greedy in enumerate(step.is_greedy) if not greedy]
    if not random_reqs:
        return final_ids
    rows = torch.tensor(random_reqs, dtype=torch.long, device=final_rows.device)  # [num_random]
    probs = step.target_probs[final_rows[rows]].float()  # [num_random, vocab]
    rejected = num_accepted[rows] < layout.num_draft_tokens[rows]  # [num_random]
    weights = _residual(probs, step.draft_probs, layout, rows, num_accepted[rows], rejected)
    request_generators = step.request_generators
    generators = None if request_generators is None else [request_generators[i] for i in random_reqs]
    final_ids[rows] = _exponential_race(weights, step.generator, generators)
    return final_ids


def _uniforms(step: _Step) -> torch.Tensor:
    """[num_reqs, max_k] U[0, 1) coins; a seeded random request draws exactly its own k_i from its generator."""
    num_reqs, max_k = step.layout.valid.shape
    device = step.layout.valid.device
    uniform = torch.rand(num_reqs, max_k, generator=step.generator, device=device)
    for row, req_generator in enumerate(step.request_generators or ()):
        num_draft = step.layout.num_draft_list[row]
        if req_generator is None or step.is_greedy[row] or num_draft == 0:
            continue
        own = torch.rand(num_draft, generator=req_generator, device=req_generator.device)  # [k_i]
        uniform[row, :num_draft] = own.to(device)
    return uniform


def _residual(probs: torch.Tensor, draft_probs: torch.Tensor | None, layout: _Layout, rows: torch.Tensor,
              num_accepted: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """max(0, p - q) at rejected rows (unnormalized: the race below does not need it), p elsewhere.

    A residual that rounds to all zeros (p == q up to float error, where rejection has probability ~0) falls
    back to p rather than emitting an arbitrary token.
    """
    if not bool(rejected.any()):
        return probs
    slot = torch.clamp(num_accepted, max=max(layout.valid.shape[1] - 1, 0))  # [num_random]; valid where rejected
    if draft_probs is None:
        rejected_ids = layout.draft_ids[rows, slot]  # [num_random]
        residual = probs.scatter(1, rejected_ids[:, None], 0.0)  # q one-hot: remove x
    else:
        # Rows that accepted everything have no draft row at `slot` (it may lie past the end): read row 0.
        draft_rows = torch.where(rejected, layout.draft_offsets[rows] + slot, 0)  # [num_random]
        residual = torch.clamp(probs - draft_probs[draft_rows].float(), min=0.0)
    usable = rejected & (residual.sum(dim=-1) > 0)  # [num_random]
    return torch.where(usable[:, None], residual, probs)


def _exponential_race(weights: torch.Tensor, generator: torch.Generator | None,
                      request_generators: Sequence[torch.Generator | None] | None) -> torch.Tensor:
    """[n] argmax(w / E), E ~ Exponential(1): draws index i with probability w_i / sum(w) per row.

    E is made as -log(U): on CPU torch's `exponential_` costs ~4x more than `rand` + `log` for the same
    [n, vocab] draw. U in [0, 1) gives E in (0, inf], so no division by zero: U = 0 makes a weight 0.
    """
    uniform = torch.rand(weights.shape, generator=generator, device=weights.device)  # [n, vocab]
    for row, req_generator in enumerate(request_generators or ()):
        if req_generator is not None:
            own = torch.rand(weights.shape[1], generator=req_generator, device=req_generator.device)  # [vocab]
            uniform[row] = own.to(weights.device)
    noise = uniform.log_().neg_()  # [n, vocab]
    return (weights / noise).argmax(dim=-1)


def _to_output(layout: _Layout, num_accepted: torch.Tensor, final_ids: torch.Tensor) -> RejectionSamplerOutput:
    """One device-to-host copy: [num_reqs, max_k + 1] accepted drafts with the final token written after them."""
    num_reqs, max_k = layout.valid.shape
    slots = torch.arange(max_k, device=num_accepted.device)
    emitted = torch.full((num_reqs, max_k + 1), -1, dtype=torch.long, device=num_accepted.device)
    emitted[:, :max_k] = torch.where(slots[None, :] < num_accepted[:, None], layout.draft_ids, -1)
    emitted.scatter_(1, num_accepted[:, None], final_ids[:, None])
    counts: list[int] = num_accepted.tolist()
    rows: list[list[int]] = emitted.tolist()
    return RejectionSamplerOutput([row[:count + 1] for row, count in zip(rows, counts)], counts)
