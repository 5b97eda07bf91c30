"""Per-request logits transforms beyond the vectorised core: `allowed_token_ids`, bad words, and user-written
logits processors that a request selects by name through `vllm_xargs`.

Writing a processor (any importable module):

```python
import torch
from workers.logits_processors import register_logits_processor

@register_logits_processor("no_digits_after_colon")
def no_digits_after_colon(output_token_ids: list[int], logits: torch.Tensor, args: dict) -> torch.Tensor | None:
    # logits: this request's [vocab] float32 row (already biased/penalised), on the model's device
    if output_token_ids and output_token_ids[-1] == args["colon_id"]:
        logits[args["digit_ids"]] = float("-inf")  # in place (or return a new [vocab] tensor)
    return None
```

Workers import the modules named in `CONVEYOR_LOGITS_PROCESSORS` (comma-separated) and every entry point of the
group `conveyor.logits_processors` at start-up (an entry point naming a function registers it under the entry
point's name; one naming a module just imports it). A request selects processors, in order, with
`"vllm_xargs": {"logits_processors": ["name", ...], ...}`; the other `vllm_xargs` keys are the `args` dict every
selected processor receives. Processors run on rank 0 after logit bias, allowed/bad tokens, min_tokens and
penalties, before temperature/top-k/top-p/min-p; reported logprobs stay those of the raw logits.

Errors stay with their request: an unknown name, or a processor raising `ValueError` (bad arguments), fails that
request with "invalid vllm_xargs: ..." (HTTP 400); any other exception with "logits processor ... failed" (500).
Other requests in the batch are not affected.
"""
from __future__ import annotations

import importlib
import logging
import os
from importlib.metadata import entry_points
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

import torch

if TYPE_CHECKING:
    from workers.sampling.state import RequestSamplingState

logger = logging.getLogger("conveyor.logits_processors")

LogitsProcessor = Callable[[list[int], torch.Tensor, dict[str, Any]], Optional[torch.Tensor]]
_F = TypeVar("_F", bound=LogitsProcessor)

ENV_VAR = "CONVEYOR_LOGITS_PROCESSORS"
ENTRY_POINT_GROUP = "conveyor.logits_processors"

_REGISTRY: dict[str, LogitsProcessor] = {}


def register_logits_processor(name: str) -> Callable[[_F], _F]:
    """Decorator: make `fn(output_token_ids, logits_row, args) -> new row | None` selectable as `name`."""
    if not isinstance(name, str) or not name:
        raise ValueError("a logits processor needs a non-empty name")

    def decorator(fn: _F) -> _F:
        if not callable(fn):
            raise TypeError(f"logits processor {name!r} must be callable, got {type(fn).__name__}")
        previous = _REGISTRY.get(name)
        if previous is not None and previous is not fn:
            logger.warning("logits processor %r registered again: the later registration replaces the earlier",
                           name)
        _REGISTRY[name] = fn
        return fn

    return decorator


def unregister_logits_processor(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered_names() -> list[str]:
    return sorted(_REGISTRY)


def get_logits_processor(name: str) -> LogitsProcessor | None:
    return _REGISTRY.get(name)


def load_plugins() -> list[str]:
    """Import `CONVEYOR_LOGITS_PROCESSORS` modules and the `conveyor.logits_processors` entry points (worker
    start-up); returns every registered name. An import error propagates: the worker must not start half-equipped."""
    for module_name in (part.strip() for part in os.environ.get(ENV_VAR, "").split(",")):
        if module_name:
            importlib.import_module(module_name)
            logger.info("logits processors: imported %s", module_name)
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry_point.load()
        if not isinstance(loaded, ModuleType) and callable(loaded) and _REGISTRY.get(entry_point.name) is not loaded:
            register_logits_processor(entry_point.name)(loaded)
        logger.info("logits processors: loaded entry point %s = %s", entry_point.name, entry_point.value)
    names = registered_names()
    logger.info("logits processors available: %s", ", ".join(names))
    return names


# --------------------------------------------------------------------------- built-in examples


def _token_id_list(args: dict[str, Any], key: str, vocab_size: int) -> list[int]:
    value = args.get(key)
    if not isinstance(value, list) or not all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        raise ValueError(f"'{key}' must be a list of token ids")
    bad = [token_id for token_id in value if not 0 <= token_id < vocab_size]
    if bad:
        raise ValueError(f"'{key}' holds token ids outside the vocabulary (size {vocab_size}): {bad[:5]}")
    return value


@register_logits_processor("ban_tokens")
def ban_tokens(output_token_ids: list[int], logits: torch.Tensor, args: dict[str, Any]) -> None:
    """Never sample the ids in `args["banned_token_ids"]`."""
    banned = _token_id_list(args, "banned_token_ids", logits.shape[-1])
    if banned:
        logits[torch.tensor(banned, dtype=torch.long, device=logits.device)] = float("-inf")


@register_logits_processor("force_tokens")
def force_tokens(output_token_ids: list[int], logits: torch.Tensor, args: dict[str, Any]) -> None:
    """Make the output start with `args["forced_token_ids"]`, one per step; free sampling afterwards."""
    forced = _token_id_list(args, "forced_token_ids", logits.shape[-1])
    position = len(output_token_ids)
    if position < len(forced):
        logits.fill_(float("-inf"))
        logits[forced[position]] = 0.0


# --------------------------------------------------------------------------- used by the sampler


def needs_request_processing(state: RequestSamplingState) -> bool:
    """Whether the row needs `apply_allowed_token_ids` or `apply_logits_processors` (cheap: attribute reads)."""
    params = state.params
    return params.allowed_token_ids is not None or bool(params.logits_processors)


def bad_word_bans(state: RequestSamplingState) -> list[int]:
    """Token ids to ban this step: the last token of every bad sequence whose other tokens end the output so far
    (vLLM's rule: a single-token bad word is always banned)."""
    sequences = state.params.bad_words_token_ids
    if not sequences:
        return []
    output = state.output_token_ids
    bans = []
    for sequence in sequences:
        prefix_len = len(sequence) - 1
        if prefix_len > len(output):
            continue
        if prefix_len == 0 or output[-prefix_len:] == sequence[:-1]:
            bans.append(sequence[-1])
    return bans


def apply_allowed_token_ids(logits: torch.Tensor, states: list[RequestSamplingState]) -> None:
    """Mask to -inf, in place, every token outside each row's `allowed_token_ids` (rows without the list stay)."""
    rows = [row for row, state in enumerate(states) if state.params.allowed_token_ids is not None]
    if not rows:
        return
    vocab_size = logits.shape[1]
    device = logits.device
    keep = torch.zeros(len(rows), vocab_size + 1, dtype=torch.bool, device=device)  # spare column: bad ids
    for index, row in enumerate(rows):
        keep[index, _allowed_ids_tensor(states[row], vocab_size, device)] = True
    row_index = torch.tensor(rows, dtype=torch.long, device=device)
    logits[row_index] = logits[row_index].masked_fill(~keep[:, :vocab_size], float("-inf"))


def _allowed_ids_tensor(state: RequestSamplingState, vocab_size: int, device: torch.device) -> torch.Tensor:
    """The allowed ids as a long tensor on `device` (ids outside the vocabulary point at the spare column),
    made once per request."""
    cached = state.allowed_ids_tensor
    if cached is None or cached.device != torch.device(device):
        ids = torch.tensor(state.params.allowed_token_ids or [], dtype=torch.long, device=device)
        cached = torch.where((ids >= 0) & (ids < vocab_size), ids, vocab_size)
        state.allowed_ids_tensor = cached
    return cached


def apply_logits_processors(logits: torch.Tensor, states: list[RequestSamplingState]) -> dict[int, str]:
    """Run each row's selected processors on its row, in order, in place. Returns {row: error message} for rows
    whose processors could not run; those rows must not be sampled."""
    errors: dict[int, str] = {}
    for row, state in enumerate(states):
        names = state.params.logits_processors
        if not names:
            continue
        args = state.params.logits_processor_args or {}
        for name in names:
            processor = _REGISTRY.get(name)
            if processor is None:
                errors[row] = (f"invalid vllm_xargs: unknown logits processor {name!r} "
                               f"(available: {', '.join(registered_names()) or 'none'})")
                break
            try:
                result = processor(state.output_token_ids, logits[row], args)
                if result is not None and result is not logits[row]:
                    if tuple(result.shape) != (logits.shape[1],):
                        raise TypeError(f"returned a tensor of shape {tuple(result.shape)}, expected "
                                        f"({logits.shape[1]},)")
                    logits[row] = result.to(device=logits.device, dtype=logits.dtype)
            except ValueError as exc:
                errors[row] = f"invalid vllm_xargs for logits processor {name!r}: {exc}"
                break
            except Exception as exc:  # a processor's own bug fails its request, not the step
                logger.exception("logits processor %r failed", name)
                errors[row] = f"logits processor {name!r} failed: {type(exc).__name__}: {exc}"
                break
    return errors
