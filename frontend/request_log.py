"""--enable-log-requests: one INFO line per engine request (vLLM's "Received request" line), with the prompt and
its token ids cut to --max-log-len."""
from __future__ import annotations

import logging

from engine_core.protocol import EngineCoreRequest
from frontend.state import FrontendState

logger = logging.getLogger("conveyor.requests")


def log_engine_request(frontend: FrontendState, request: EngineCoreRequest) -> None:
    """Log `request` if the operator asked for it; costs one attribute read otherwise."""
    config = frontend.frontend_config
    if not config.enable_log_requests:
        return
    limit = config.max_log_len
    token_ids = request.prompt_token_ids if limit is None else request.prompt_token_ids[:limit]
    prompt = frontend.tokenizer.decode(token_ids, skip_special_tokens=False)
    params = request.pooling_params if request.pooling_params is not None else request.sampling_params
    logger.info("Received request %s: prompt: %r, prompt_token_ids: %s%s, params: %s", request.request_id,
                prompt if limit is None else prompt[:limit], token_ids,
                "" if limit is None or len(request.prompt_token_ids) <= limit else
                f" (+{len(request.prompt_token_ids) - limit} more)", params)
