"""Engine outputs -> text: incremental detokenization, stop strings, per-token logprob records.

One `ChoiceState` per engine request (per choice). Text is emitted only when it is final:
- bytes of a character split across tokens are held until the character is complete (no U+FFFD mid-stream);
- with stop strings, the last `max(len(stop)) - 1` characters are held back, since they may be the start of a
  stop string; a match truncates the text (the stop string excluded unless `include_stop_str_in_output`) and
  finishes the choice with finish_reason "stop" — the caller then stops reading, which aborts the engine request.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenizers.decoders import DecodeStream

from engine_core.protocol import EngineCoreOutput, TokenLogprobs
from frontend.errors import engine_error
from frontend.tokenizer import TokenizerInfo

_NUM_PROMPT_CONTEXT_TOKENS = 8  # prompt tail fed to the decoder so the first token's leading space is right


class IncrementalDetokenizer:
    """Token ids in, complete characters out."""

    def __init__(self, tokenizer: TokenizerInfo, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = prompt_token_ids[-_NUM_PROMPT_CONTEXT_TOKENS:]
        self._stream = DecodeStream(context, skip_special_tokens=skip_special_tokens)
        self._pending_ids: list[int] = []  # tokens whose bytes do not make a complete character yet

    def step(self, token_id: int) -> str:
        piece = self._stream.step(self._tokenizer.tokenizer, token_id)
        if piece is None:
            self._pending_ids.append(token_id)
            return ""
        self._pending_ids.clear()
        return str(piece)

    def flush(self) -> str:
        """At the end of generation: whatever is still held, decoded with replacement characters."""
        if not self._pending_ids:
            return ""
        text = self._tokenizer.decode(self._pending_ids, skip_special_tokens=self._skip_special_tokens)
        self._pending_ids.clear()
        return text


def find_stop_string(text: str, num_new_chars: int, stop: list[str]) -> tuple[int, str] | None:
    """Earliest stop string that ends inside the last `num_new_chars` characters: (start index, stop string)."""
    best: tuple[int, str] | None = None
    for stop_str in stop:
        start = text.find(stop_str, max(0, len(text) - num_new_chars - len(stop_str) + 1))
        if start != -1 and (best is None or start < best[0]):
            best = (start, stop_str)
    return best


@dataclass
class TokenRecord:
    """One generated token as logprob formatters need it."""

    token_id: int
    text_offset: int  # where the token's text starts in the choice's output text
    logprobs: TokenLogprobs | None


@dataclass
class ChoiceDelta:
    """What one engine output added to a choice."""

    index: int
    text: str
    tokens: list[TokenRecord]
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class ChoiceState:
    """Output-side state of one choice (one engine request)."""

    index: int
    request_id: str
    prompt_index: int
    detokenizer: IncrementalDetokenizer
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    text: str = ""
    num_sent_chars: int = 0
    token_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    kv_transfer_params: dict[str, Any] | None = None  # a prefill instance's answer for the decode instance
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # with prompt_logprobs: from the first output
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def _hold_chars(self) -> int:
        if self.finished or not self.stop or self.include_stop_str_in_output:
            return 0
        return max(len(stop_str) for stop_str in self.stop) - 1

    def process(self, output: EngineCoreOutput) -> ChoiceDelta:
        """Fold one engine output in; raises the mapped APIError if the engine failed the request."""
        if output.finish_reason == "error":
            raise engine_error(str(output.stop_reason or "the engine failed the request"))
        self.num_cached_tokens = max(self.num_cached_tokens, output.num_cached_tokens)
        if output.kv_transfer_params is not None:
            self.kv_transfer_params = output.kv_transfer_params
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        records: list[TokenRecord] = []
        # the engine stopped on a token: EOS (stop_reason None) or one of stop_token_ids (the id)
        stop_token = output.finish_reason == "stop" and (output.stop_reason is None
                                                         or isinstance(output.stop_reason, int))
        last = len(output.new_token_ids) - 1
        for position, token_id in enumerate(output.new_token_ids):
            logprobs = output.new_logprobs[position] if output.new_logprobs and position < len(
                output.new_logprobs) else None
            records.append(TokenRecord(token_id, len(self.text), logprobs))
            self.token_ids.append(token_id)
            if stop_token and position == last and not self.include_stop_str_in_output:
                break  # an EOS / stop token ends the text without appearing in it
            if self._append_text(self.detokenizer.step(token_id)):
                break
        if not self.finished and output.finish_reason is not None:
            self._append_text(self.detokenizer.flush())
            if not self.finished:
                self.finish_reason, self.stop_reason = output.finish_reason, output.stop_reason
        return ChoiceDelta(self.index, self._take_text(), records, self.finish_reason, self.stop_reason)

    def _append_text(self, piece: str) -> bool:
        """Append detokenized text; True if it completed a stop string (the choice is then finished)."""
        if not piece:
            return False
        self.text += piece
        if not self.stop:
            return False
        hit = find_stop_string(self.text, len(piece), self.stop)
        if hit is None:
            return False
        start, stop_str = hit
        self.text = self.text[:start + len(stop_str)] if self.include_stop_str_in_output else self.text[:start]
        self.finish_reason, self.stop_reason = "stop", stop_str
        return True

    def _take_text(self) -> str:
        end = max(self.num_sent_chars, len(self.text) - self._hold_chars)
        delta = self.text[self.num_sent_chars:end]
        self.num_sent_chars = end
        return delta
