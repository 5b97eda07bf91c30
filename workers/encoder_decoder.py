"""The model runner's side of an encoder-decoder speech model (Whisper): audio in, cross-attention slots, and
Whisper's token suppression.

Request life cycle, per request id:

    NewRequestData (audio) --start--> pending --first scheduled step: prepare--> encoded (owns a slot)
        --finish (finished / aborted / preempted: the core re-sends NewRequestData, audio included)--> gone

`prepare` turns every pending request of a step into log-mel features and runs the encoder on them together
(a few windows per forward), writing each decoder layer's cross-attention K/V into the request's slot. A request
without audio, or with audio that is not 16 kHz float32 PCM of at most 30 s, fails alone (`request_errors`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from workers.audio_features import log_mel_features, pcm_from_bytes

if TYPE_CHECKING:
    from engine_core.protocol import AudioInput
    from workers.sampler import RequestSamplingState
    from workers.models.whisper import WhisperForConditionalGeneration

# Windows per encoder forward: bounds activation memory when many requests start in the same step.
_ENCODER_BATCH = 4
NO_AUDIO_ERROR = "this model transcribes speech: the request must carry audio (16 kHz mono float32 PCM, <= 30 s)"


class EncoderDecoderRequests:
    """Audio and cross-attention slots of the running requests (every rank keeps the same; rank 0 also samples)."""

    def __init__(self, model: WhisperForConditionalGeneration, hf_config: Any, device: torch.device) -> None:
        self.model, self.device = model, device
        self.pending_audio: dict[str, AudioInput | None] = {}  # started, not yet encoded
        self.slots: dict[str, int] = {}  # encoded: request id -> cross-attention slot
        suppress = list(getattr(hf_config, "suppress_tokens", None) or [])
        begin_suppress = list(getattr(hf_config, "begin_suppress_tokens", None) or [])
        vocab_size = int(hf_config.vocab_size)
        self.suppress_ids = torch.tensor([i for i in suppress if 0 <= i < vocab_size], dtype=torch.int64,
                                         device=device)
        self.begin_suppress_ids = torch.tensor([i for i in begin_suppress if 0 <= i < vocab_size],
                                               dtype=torch.int64, device=device)

    def start(self, request_id: str, audio: AudioInput | None) -> None:
        """A new request (or one re-sent after preemption): forget any earlier encoding, encode at its next step."""
        self.finish(request_id)
        self.pending_audio[request_id] = audio

    def finish(self, request_id: str) -> None:
        """Free the request's slot (finished, aborted or preempted)."""
        self.pending_audio.pop(request_id, None)
        slot = self.slots.pop(request_id, None)
        if slot is not None:
            self.model.cross_cache.free(slot)

    def prepare(self, request_ids: list[str], request_errors: dict[str, str]) -> list[int]:
        """Encode this step's pending requests; the cross-attention slot of each request in `request_ids` (-1 for
        one that failed, its error added to `request_errors`)."""
        windows: list[tuple[str, torch.Tensor]] = []
        for request_id in request_ids:
            if request_id not in self.pending_audio:
                continue
            audio = self.pending_audio.pop(request_id)
            if audio is None:
                request_errors[request_id] = NO_AUDIO_ERROR
                continue
            try:
                windows.append((request_id, pcm_from_bytes(audio.samples)))
            except ValueError as exc:
                request_errors[request_id] = f"invalid audio: {exc}"
        for start in range(0, len(windows), _ENCODER_BATCH):
            self._encode(windows[start:start + _ENCODER_BATCH])
        return [self.slots.get(request_id, -1) for request_id in request_ids]

    def _encode(self, windows: list[tuple[str, torch.Tensor]]) -> None:
        features = log_mel_features([pcm for _, pcm in windows], self.model.num_mel_bins, self.device)
        slots = [self.model.cross_cache.allocate() for _ in windows]
        self.model.encode_into_slots(features, slots)  # [N, mel, 3000] -> K/V in the slots
        for (request_id, _), slot in zip(windows, slots):
            self.slots[request_id] = slot

    def profile(self) -> None:
        """One encoder batch of silent windows (CUDA memory profiling); the slots are freed again."""
        self._encode([(f"profile-{i}", torch.zeros(1)) for i in range(_ENCODER_BATCH)])
        for i in range(_ENCODER_BATCH):
            self.finish(f"profile-{i}")

    def suppress(self, logits: torch.Tensor, states: list[RequestSamplingState]) -> None:
        """Whisper's logits processors, in place on [num_sampling_rows, vocab] (row i is `states[i]`'s):
        `suppress_tokens` on every row, `begin_suppress_tokens` on rows sampling their request's first token, as
        transformers' SuppressTokensLogitsProcessor / SuppressTokensAtBeginLogitsProcessor do in `generate()`."""
        first_rows = [row for row, state in enumerate(states) if not state.output_token_ids]
        if self.suppress_ids.numel():
            logits.index_fill_(1, self.suppress_ids, float("-inf"))
        if first_rows and self.begin_suppress_ids.numel():
            rows = torch.tensor(first_rows, dtype=torch.int64, device=logits.device)
            logits[rows.unsqueeze(1), self.begin_suppress_ids.unsqueeze(0)] = float("-inf")
