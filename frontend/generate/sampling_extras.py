"""vLLM's sampling extras -> `SamplingParams` fields, each invalid value a 400 naming its parameter.

- `allowed_token_ids`: a non-empty list of ids in the vocabulary.
- `bad_words`: strings, tokenized as vLLM does: each word with its leading whitespace stripped, once as is and once
  after a space (so the word is banned at the start of the text and mid-text); the spaced variant is kept only
  when it has as many tokens as the plain one and starts with another token.
- `prompt_logprobs`: 0..20 alternatives. vLLM's -1 (the whole vocabulary) exceeds the 20 alternatives allowed, as
  with vLLM's default `--max-logprobs 20`: 400. Not with `stream` (vLLM: "not available when stream=True") unless
  0, which a stream then ignores (streams carry no prompt logprobs).
- `repetition_detection`: {"min_pattern_len", "max_pattern_len", "min_repeats"} or vLLM's own names
  {"min_pattern_size", "max_pattern_size", "min_count"} (max_pattern_size 0 disables, min_pattern_size 0 means 1).
- `vllm_xargs`: {"logits_processors": name or [names], ...args}: the names must be registered on the workers (the
  engine lists them at start-up); the remaining keys are the `args` every selected processor receives.
"""
from __future__ import annotations

from collections.abc import Collection
from typing import Any

from engine_core.protocol import RepetitionDetection
from frontend.errors import BadRequestError
from frontend.generate.protocol import SamplingRequest
from frontend.tokenizer import TokenizerInfo

MAX_PROMPT_LOGPROBS = 20
MAX_PATTERN_LEN = 1024
MAX_REPEATS = 1024
LOGITS_PROCESSORS_KEY = "logits_processors"

_OUR_NAMES = ("min_pattern_len", "max_pattern_len", "min_repeats")
_VLLM_NAMES = ("min_pattern_size", "max_pattern_size", "min_count")


def allowed_token_ids(request: SamplingRequest, tokenizer: TokenizerInfo) -> list[int] | None:
    ids = request.allowed_token_ids
    if ids is None:
        return None
    if not ids:
        raise BadRequestError("invalid value for 'allowed_token_ids': the list must not be empty",
                              param="allowed_token_ids")
    bad = [token_id for token_id in ids if not tokenizer.is_valid_id(token_id)]
    if bad:
        raise BadRequestError(f"invalid value for 'allowed_token_ids': token id {bad[0]} is out of vocabulary "
                              f"(size {tokenizer.vocab_size})", param="allowed_token_ids")
    return sorted(set(ids))


def bad_words_token_ids(request: SamplingRequest, tokenizer: TokenizerInfo) -> list[list[int]]:
    sequences: list[list[int]] = []
    for word in request.bad_words or []:
        stripped = word.lstrip()
        if not stripped:
            raise BadRequestError("invalid value for 'bad_words': a bad word must not be empty or only whitespace",
                                  param="bad_words")
        plain = tokenizer.encode(stripped, add_special_tokens=False)
        spaced = tokenizer.encode(" " + stripped, add_special_tokens=False)
        if not plain:
            raise BadRequestError(f"invalid value for 'bad_words': {word!r} has no tokens", param="bad_words")
        sequences.append(plain)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            sequences.append(spaced)
    return sequences


def prompt_logprobs(request: SamplingRequest) -> int | None:
    value = request.prompt_logprobs
    if value is None:
        return None
    if value < 0:
        raise BadRequestError(f"invalid value for 'prompt_logprobs': {value} (the whole vocabulary) is not "
                              f"supported; ask for 0..{MAX_PROMPT_LOGPROBS} alternatives", param="prompt_logprobs")
    if request.stream:
        if value > 0:
            raise BadRequestError("prompt_logprobs are not available when stream=True", param="prompt_logprobs")
        return None  # 0 with a stream: accepted (as by vLLM) and nothing to send
    return value


def repetition_detection(request: SamplingRequest) -> RepetitionDetection | None:
    spec = request.repetition_detection
    if spec is None:
        return None
    unknown = sorted(set(spec) - set(_OUR_NAMES) - set(_VLLM_NAMES))
    if unknown:
        raise _bad_repetition(f"unknown key(s) {unknown}; use {', '.join(_OUR_NAMES)} (or vLLM's "
                              f"{', '.join(_VLLM_NAMES)})")
    for key, value in spec.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise _bad_repetition(f"'{key}' must be an integer (got {value!r})")
    for ours, vllms in zip(_OUR_NAMES, _VLLM_NAMES):
        if ours in spec and vllms in spec and spec[ours] != spec[vllms]:
            raise _bad_repetition(f"'{ours}' and '{vllms}' name the same setting; give one")
    if "max_pattern_size" in spec and spec["max_pattern_size"] == 0:
        return None  # vLLM: 0 disables the detection
    defaults = RepetitionDetection()
    min_len = _pick(spec, 0, defaults.min_pattern_len)
    if "min_pattern_size" in spec and spec["min_pattern_size"] == 0:
        min_len = 1  # vLLM: 0 means 1
    max_len = _pick(spec, 1, max(defaults.max_pattern_len, min_len))
    repeats = _pick(spec, 2, defaults.min_repeats)
    if not 1 <= min_len <= max_len <= MAX_PATTERN_LEN:
        raise _bad_repetition(f"need 1 <= min_pattern_len <= max_pattern_len <= {MAX_PATTERN_LEN} "
                              f"(got {min_len} and {max_len})")
    if not 2 <= repeats <= MAX_REPEATS:
        raise _bad_repetition(f"min_repeats must be between 2 and {MAX_REPEATS} (got {repeats})")
    return RepetitionDetection(min_pattern_len=min_len, max_pattern_len=max_len, min_repeats=repeats)


def _pick(spec: dict[str, Any], index: int, default: int) -> int:
    value = spec.get(_OUR_NAMES[index], spec.get(_VLLM_NAMES[index], default))
    return int(value)


def _bad_repetition(detail: str) -> BadRequestError:
    return BadRequestError(f"invalid value for 'repetition_detection': {detail}", param="repetition_detection")


def logits_processors(request: SamplingRequest,
                      known: Collection[str]) -> tuple[list[str], dict[str, Any] | None]:
    """(selected processor names, their args) from vllm_xargs; `known` empty = the engine did not say (an older
    engine): names are then checked by the workers, which fail the request with the same 400."""
    xargs = request.vllm_xargs
    if not xargs or LOGITS_PROCESSORS_KEY not in xargs:
        return [], None
    selected = xargs[LOGITS_PROCESSORS_KEY]
    names = [selected] if isinstance(selected, str) else selected
    if not isinstance(names, list) or not names or not all(isinstance(name, str) and name for name in names):
        raise BadRequestError("invalid value for 'vllm_xargs': 'logits_processors' must be a processor name or a "
                              "non-empty list of names", param="vllm_xargs")
    unknown = [name for name in names if known and name not in known]
    if unknown:
        raise BadRequestError(f"invalid value for 'vllm_xargs': unknown logits processor {unknown[0]!r} "
                              f"(available: {', '.join(sorted(known))})", param="vllm_xargs")
    args = {key: value for key, value in xargs.items() if key != LOGITS_PROCESSORS_KEY}
    return list(names), args
