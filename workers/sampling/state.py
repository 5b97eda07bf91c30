"""Per-request sampling state that the model runner owns and every sampling stage reads (the sampler, the
logits processors, the structured-output matchers)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_core.protocol import SamplingParams


@dataclass
class RequestSamplingState:
    """Sampling state of one live request, owned by the model runner.

    The runner appends each sampled token to `output_token_ids`. `generator` is seeded once from
    `params.seed` (None without a seed) and advances one [vocab] draw per sampled (non-greedy) step.
    `prompt_ids_tensor` caches the prompt on the logits' device for the repetition penalty; the sampler
    fills it on first use.
    """

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    eos_token_id: int | None = None
    prompt_ids_tensor: torch.Tensor | None = None
    allowed_ids_tensor: torch.Tensor | None = None  # params.allowed_token_ids on the logits' device (cached)



def make_sampling_state(
    params: SamplingParams,
    prompt_token_ids: list[int],
    output_token_ids: list[int],
    eos_token_id: int | None,
    device: torch.device | str,
) -> RequestSamplingState:
    """A request's sampling state; its generator (if seeded) lives on `device`, where the logits are."""
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed)
    return RequestSamplingState(params, prompt_token_ids, output_token_ids, generator, eos_token_id)
