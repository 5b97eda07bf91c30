"""The model runner's side of an encoder-decoder speech model (Whisper): audio in, cross-attention slots, and
Whisper's token suppression.

Request life cycle, per request id:

    NewRequestData (audio) --start--> pending --first scheduled step: prepare--> encoded (owns a slot)
        --finish (finished / aborted / preempted: the core re-sends NewRequestData, audio included)--> gone

`prepare` turns every pending request of a step into log-mel features and runs the encoder on them together
(a few windows per forward), writing each decoder layer's cross-attention K/V into the request's slot. A request
without audio, or with audio that is not 16 kHz float32 PCM of at most 30 s, fails alone (`request_errors`).

Sampling rows get Whisper's logits processors in transformers' `generate()` order: `begin_suppress_tokens` (first
token only), `suppress_tokens`, then, for a request whose decoder prompt has no `<|notimestamps|>` (and which does
not restrict `allowed_token_ids`, as language detection does), the timestamp rules of transformers'
WhisperTimeStampLogitsProcessor (`return_timestamps=True`):

    output:  <|t0|> text ... <|t1|><|t1'|> text ... <|t2|> <|endoftext|>      t0 <= max_initial_timestamp_index
    - never <|notimestamps|>; the first token is a timestamp (at most the initial limit)
    - after a timestamp that follows text: a timestamp (>= it) or end-of-text; after a pair (or the first
      timestamp): text
    - timestamps never decrease; a pair's second timestamp may repeat the first, no other may
    - when the summed probability of the timestamp tokens beats every single text token, a timestamp is forced
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import torch

from workers.encoder_decoder.audio_features import log_mel_features, pcm_from_bytes

if TYPE_CHECKING:
    from engine_core.protocol import AudioInput
    from workers.models.whisper import WhisperForConditionalGeneration
    from workers.sampling.state import RequestSamplingState

# Windows per encoder forward: bounds activation memory when many requests start in the same step.
_ENCODER_BATCH = 4
# openai/whisper and CTranslate2: the first timestamp is at most 1.0 s (50 steps of 0.02 s). A folder with a
# generation_config.json follows it as transformers does (no `max_initial_timestamp_index` there: no limit).
DEFAULT_MAX_INITIAL_TIMESTAMP_INDEX = 50
NO_AUDIO_ERROR = "this model transcribes speech: the request must carry audio (16 kHz mono float32 PCM, <= 30 s)"


class EncoderDecoderRequests:
    """Audio and cross-attention slots of the running requests (every rank keeps the same; rank 0 also samples)."""

    def __init__(self, model: WhisperForConditionalGeneration, hf_config: Any, device: torch.device,
                 model_path: str | None = None) -> None:
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
        self.eos_id = int(hf_config.eos_token_id)
        self.no_timestamps_id, self.max_initial_timestamp_index = timestamp_settings(model_path, vocab_size)
        self.timestamp_begin = self.no_timestamps_id + 1  # <|0.00|>; then one token per 0.02 s

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
        transformers' SuppressTokensLogitsProcessor / SuppressTokensAtBeginLogitsProcessor do in `generate()`; then
        the timestamp rules on the rows of requests decoding with timestamps."""
        first_rows = [row for row, state in enumerate(states) if not state.output_token_ids]
        if self.suppress_ids.numel():
            logits.index_fill_(1, self.suppress_ids, float("-inf"))
        if first_rows and self.begin_suppress_ids.numel():
            rows = torch.tensor(first_rows, dtype=torch.int64, device=logits.device)
            logits[rows.unsqueeze(1), self.begin_suppress_ids.unsqueeze(0)] = float("-inf")
        timestamp_rows = [row for row, state in enumerate(states) if self.wants_timestamps(state)]
        if timestamp_rows:
            self._timestamp_rules(logits, timestamp_rows, states)

    def wants_timestamps(self, state: RequestSamplingState) -> bool:
        """A request decodes with timestamps when its prompt lacks <|notimestamps|> (language detection, which
        names its allowed tokens, never does)."""
        return not state.params.allowed_token_ids and self.no_timestamps_id not in state.prompt_token_ids

    def _timestamp_rules(self, logits: torch.Tensor, rows: list[int], states: list[RequestSamplingState]) -> None:
        """transformers' WhisperTimeStampLogitsProcessor on `logits[rows]`, in place (see the module docstring)."""
        begin, vocab_size = self.timestamp_begin, logits.shape[1]
        if begin >= vocab_size:
            return
        no_timestamp, no_text, first, lowest = [], [], [], []
        for row in rows:
            output = states[row].output_token_ids
            last_was_timestamp = len(output) >= 1 and output[-1] >= begin
            penultimate_was_timestamp = len(output) < 2 or output[-2] >= begin
            no_timestamp.append(last_was_timestamp and penultimate_was_timestamp)  # a pair just closed: text
            no_text.append(last_was_timestamp and not penultimate_was_timestamp)  # a segment just ended
            first.append(not output)
            last = next((token for token in reversed(output) if token >= begin), None)
            if last is None:
                lowest.append(begin)
            else:  # the pair's second timestamp may equal the first; nothing else repeats one
                lowest.append(last if last_was_timestamp and not penultimate_was_timestamp else last + 1)
        device = logits.device
        index = torch.tensor(rows, dtype=torch.int64, device=device)
        scores = logits.index_select(0, index)  # [R, vocab]
        vocab_ids = torch.arange(vocab_size, device=device)  # [vocab]
        is_timestamp = vocab_ids >= begin  # [vocab]

        def column(flags: list[bool] | list[int]) -> torch.Tensor:
            return torch.tensor(flags, device=device).unsqueeze(1)  # [R, 1]

        forbid = is_timestamp & (vocab_ids < column(lowest))  # [R, vocab]
        forbid |= column(no_timestamp) & is_timestamp
        forbid |= column(no_text) & (vocab_ids < self.eos_id)
        initial = ~is_timestamp
        if self.max_initial_timestamp_index is not None:
            initial = initial | (vocab_ids > begin + self.max_initial_timestamp_index)
        forbid |= column(first) & initial
        forbid[:, self.no_timestamps_id] = True
        scores.masked_fill_(forbid, float("-inf"))
        # A timestamp when the timestamps' total probability beats every single text token.
        logprobs = torch.log_softmax(scores.float(), dim=-1)  # [R, vocab]
        timestamp_logprob = logprobs[:, begin:].logsumexp(dim=-1)  # [R]
        max_text_logprob = logprobs[:, :begin].max(dim=-1).values  # [R]
        scores[:, :begin].masked_fill_((timestamp_logprob > max_text_logprob).unsqueeze(1), float("-inf"))
        logits.index_copy_(0, index, scores)


def timestamp_settings(model_path: str | None, vocab_size: int) -> tuple[int, int | None]:
    """(<|notimestamps|> id, max_initial_timestamp_index) of the Whisper checkpoint in `model_path`: from its
    generation_config.json, as transformers' `generate()` reads it; a CTranslate2 folder (none there) or a folder
    without one: the id from tokenizer.json, else Whisper's fixed layout (multilingual vocabularies shift the
    special ids by one), and openai/whisper's 1.0 s initial limit."""
    generation: dict[str, Any] = {}
    special: dict[str, int] = {}
    max_initial: Any = DEFAULT_MAX_INITIAL_TIMESTAMP_INDEX
    if model_path is not None and os.path.isdir(model_path):
        from workers.loading.ctranslate2 import is_ctranslate2_folder, read_whisper_generation_config

        config_path = os.path.join(model_path, "generation_config.json")
        if is_ctranslate2_folder(model_path):
            generation = read_whisper_generation_config(model_path)
        elif os.path.isfile(config_path):
            generation = _read_json(config_path)
            max_initial = generation.get("max_initial_timestamp_index")
        special = {str(token.get("content")): int(token.get("id", -1))
                   for token in _read_json(os.path.join(model_path, "tokenizer.json")).get("added_tokens", [])
                   if isinstance(token, dict)}
    no_timestamps = generation.get("no_timestamps_token_id", special.get("<|notimestamps|>"))
    if not isinstance(no_timestamps, int):
        no_timestamps = 50362 + (1 if vocab_size >= 51865 else 0)
    return no_timestamps, (int(max_initial) if isinstance(max_initial, int) else None)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
