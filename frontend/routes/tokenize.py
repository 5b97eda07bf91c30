"""POST /tokenize (a prompt, or chat messages through the template) and POST /detokenize."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends
from pydantic import ValidationError

from frontend.dependencies import get_state
from frontend.errors import validation_error
from frontend.generate.chat_prompt import render_chat_prompt
from frontend.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest
from frontend.state import FrontendState
from frontend.tokenizer import check_token_ids

router = APIRouter()


@router.post("/tokenize")
async def tokenize(body: dict[str, Any] = Body(...), state: FrontendState = Depends(get_state)) -> dict[str, Any]:
    try:
        request: TokenizeChatRequest | TokenizeCompletionRequest = (
            TokenizeChatRequest.model_validate(body) if "messages" in body
            else TokenizeCompletionRequest.model_validate(body))
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    state.check_model(request.model)
    text = render_chat_prompt(state, request) if isinstance(request, TokenizeChatRequest) else request.prompt
    tokens = state.tokenizer.encode(text, request.add_special_tokens)
    token_strs = [state.tokenizer.tokenizer.id_to_token(token) for token in tokens] \
        if request.return_token_strs else None
    return {"count": len(tokens), "max_model_len": state.model_config.max_model_len, "tokens": tokens,
            "token_strs": token_strs}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, state: FrontendState = Depends(get_state)) -> dict[str, str]:
    state.check_model(body.model)
    check_token_ids(body.tokens, state.tokenizer, "tokens")
    return {"prompt": state.tokenizer.decode(body.tokens, skip_special_tokens=False)}
