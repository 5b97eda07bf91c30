"""Engine logprobs -> the two OpenAI shapes: legacy completions and chat completions."""
from __future__ import annotations

from typing import Any, Callable

from engine_core.protocol import TokenLogprobs
from frontend.detokenizer import TokenRecord
from frontend.tokenizer import TokenizerInfo

_MIN_LOGPROB = -9999.0  # JSON has no -inf


def _clamp(logprob: float) -> float:
    return logprob if logprob > _MIN_LOGPROB else _MIN_LOGPROB


def _token_namer(tokenizer: TokenizerInfo, as_token_ids: bool) -> Callable[[int], str]:
    """vLLM's return_tokens_as_token_ids: "token_id:N" instead of the token's text (unambiguous for clients)."""
    return (lambda token_id: f"token_id:{token_id}") if as_token_ids else tokenizer.token_text


def completion_logprobs(tokenizer: TokenizerInfo, records: list[TokenRecord], text_offset_base: int,
                        num_top: int, as_token_ids: bool = False) -> dict[str, list[Any]]:
    """{tokens, token_logprobs, top_logprobs: [{token text: logprob}], text_offset}; the chosen token is
    always among its position's top_logprobs (vLLM's convention)."""
    name = _token_namer(tokenizer, as_token_ids)
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offsets: list[int] = []
    for record in records:
        text = name(record.token_id)
        tokens.append(text)
        text_offsets.append(text_offset_base + record.text_offset)
        if record.logprobs is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_clamp(record.logprobs.logprob))
        # Distinct ids can read the same (two partial bytes both show as U+FFFD): first entry wins, so the
        # chosen token keeps its own logprob and the others keep their best.
        top = {text: _clamp(record.logprobs.logprob)}
        for token_id, logprob in zip(record.logprobs.top_token_ids[:num_top], record.logprobs.top_logprobs[:num_top]):
            top.setdefault(name(token_id), _clamp(logprob))
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offsets}


def chat_logprobs(tokenizer: TokenizerInfo, records: list[TokenRecord], num_top: int,
                  as_token_ids: bool = False) -> dict[str, Any]:
    """{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], refusal: None}."""
    name = _token_namer(tokenizer, as_token_ids)
    content: list[dict[str, Any]] = []
    for record in records:
        entry: dict[str, Any] = {"token": name(record.token_id),
                                 "logprob": _MIN_LOGPROB, "bytes": tokenizer.token_bytes(record.token_id),
                                 "top_logprobs": []}
        if record.logprobs is not None:
            entry["logprob"] = _clamp(record.logprobs.logprob)
            entry["top_logprobs"] = [
                {"token": name(token_id), "logprob": _clamp(logprob),
                 "bytes": tokenizer.token_bytes(token_id)}
                for token_id, logprob in zip(record.logprobs.top_token_ids[:num_top],
                                             record.logprobs.top_logprobs[:num_top])]
        content.append(entry)
    return {"content": content, "refusal": None}


def prompt_logprobs_json(tokenizer: TokenizerInfo, prompt_token_ids: list[int],
                         entries: list[TokenLogprobs | None] | None,
                         as_token_ids: bool = False) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id (string key): {logprob, rank,
    decoded_token}} holding the actual token, then the top-k alternatives (ranks 1..k)."""
    if entries is None:
        return None
    name = _token_namer(tokenizer, as_token_ids)
    result: list[dict[str, dict[str, Any]] | None] = []
    for token_id, entry in zip(prompt_token_ids, entries):
        if entry is None:
            result.append(None)
            continue
        position = {str(token_id): {"logprob": _clamp(entry.logprob), "rank": entry.rank,
                                    "decoded_token": name(token_id)}}
        for rank, (top_id, logprob) in enumerate(zip(entry.top_token_ids, entry.top_logprobs), start=1):
            position.setdefault(str(top_id), {"logprob": _clamp(logprob), "rank": rank,
                                              "decoded_token": name(top_id)})
        result.append(position)
    return result
