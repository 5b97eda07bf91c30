"""Beam search (vLLM's `use_beam_search`, `length_penalty`), run by the frontend on top of the engine.

Each step asks the engine for one greedy token of every live beam with the top 2 x width logprobs (prefix caching
makes re-sending a beam's tokens cheap: only its last block is computed again), expands every beam by those
candidates, and keeps the `width` best by cumulative logprob. A candidate ending in a stop token is a finished
hypothesis. At the end hypotheses rank by cumulative logprob / generated_length ** length_penalty (Hugging Face's
convention) and the `n` best are the choices.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from engine_core.protocol import EngineCoreRequest, SamplingParams
from frontend.errors import BadRequestError, engine_error
from frontend.generate.protocol import SamplingRequest
from frontend.state import FrontendState


@dataclass
class Hypothesis:
    token_ids: list[int] = field(default_factory=list)  # generated tokens, a final stop token included
    cumulative_logprob: float = 0.0
    finished_by_stop: bool = False

    def score(self, length_penalty: float) -> float:
        return self.cumulative_logprob / (max(1, len(self.token_ids)) ** length_penalty)


def check_beam_search_request(request: SamplingRequest, logprobs_requested: bool) -> None:
    """Beam search returns whole sequences: fields that need per-token sampling or streaming are refused."""
    for name, given in (("stream", request.stream), ("logprobs", logprobs_requested),
                        ("structured_outputs", request.structured_outputs is not None),
                        ("response_format", request.response_format is not None)):
        if given:
            raise BadRequestError(f"use_beam_search cannot be combined with {name}", param=name)


async def beam_search(frontend: FrontendState, request: SamplingRequest, request_id: str, prompt_token_ids: list[int],
                      width: int, max_tokens: int) -> list[Hypothesis]:
    """The `width` best hypotheses, best first."""
    stop_ids = set(request.stop_token_ids or []) | set(frontend.eos.extra_stop_token_ids)
    if frontend.eos.eos_token_id is not None and not request.ignore_eos:
        stop_ids.add(frontend.eos.eos_token_id)
    beams = [Hypothesis()]
    finished: list[Hypothesis] = []
    for step in range(max_tokens):
        tops = await asyncio.gather(*(_top_tokens(frontend, request, f"{request_id}-s{step}b{i}",
                                                  prompt_token_ids + beam.token_ids, 2 * width)
                                      for i, beam in enumerate(beams)))
        candidates: list[Hypothesis] = []
        for beam, top in zip(beams, tops):
            for token_id, logprob in top:
                candidate = Hypothesis(beam.token_ids + [token_id], beam.cumulative_logprob + logprob)
                if token_id in stop_ids and len(candidate.token_ids) > request.min_tokens:
                    candidate.finished_by_stop = True
                    finished.append(candidate)
                else:
                    candidates.append(candidate)
        candidates.sort(key=lambda hypothesis: hypothesis.cumulative_logprob, reverse=True)
        beams = candidates[:width]
        if not beams:
            break
    finished.extend(beams)
    finished.sort(key=lambda hypothesis: hypothesis.score(request.length_penalty), reverse=True)
    return finished[:width]


async def _top_tokens(frontend: FrontendState, request: SamplingRequest, engine_request_id: str,
                      token_ids: list[int], k: int) -> list[tuple[int, float]]:
    """The k most likely next tokens of `token_ids` with their logprobs (raw distribution)."""
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=k, ignore_eos=True)
    engine_request = EngineCoreRequest(
        request_id=engine_request_id, prompt_token_ids=token_ids, sampling_params=params,
        eos_token_id=frontend.eos.eos_token_id, arrival_time=time.time(), priority=request.priority,
        cache_salt=request.cache_salt, client_index=frontend.engine.client_index)
    async for output in frontend.engine.generate(engine_request):
        if output.finish_reason == "error":
            raise engine_error(str(output.stop_reason))
        if output.new_logprobs:
            top = output.new_logprobs[0]
            return list(zip(top.top_token_ids[:k], top.top_logprobs[:k]))
    return []


def hypothesis_text(frontend: FrontendState, request: SamplingRequest, hypothesis: Hypothesis) -> str:
    token_ids = hypothesis.token_ids[:-1] if hypothesis.finished_by_stop else hypothesis.token_ids
    return frontend.tokenizer.decode(token_ids, skip_special_tokens=request.skip_special_tokens)


def beam_usage(prompts: list[list[int]], results: list[list[Hypothesis]]) -> dict[str, object]:
    prompt_tokens = sum(len(prompt) for prompt in prompts)
    completion_tokens = sum(len(h.token_ids) for hypotheses in results for h in hypotheses)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": 0}}


async def beam_search_all(frontend: FrontendState, request: SamplingRequest, request_id: str,
                          prompts: list[list[int]], max_tokens: list[int]) -> list[list[Hypothesis]]:
    """`request.n` hypotheses (the beam width) for every prompt."""
    return list(await asyncio.gather(*(beam_search(frontend, request, f"{request_id}-p{i}", prompt, request.n, limit)
                                       for i, (prompt, limit) in enumerate(zip(prompts, max_tokens)))))
