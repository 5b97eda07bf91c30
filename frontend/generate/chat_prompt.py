"""Chat messages -> the prompt text, through the model's chat template (or the request's own, when trusted).

Chat completions, the Responses API, the pooling endpoints' chat inputs and /tokenize all render through here.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from engine_core.protocol import MultiModalItem
from frontend.chat_template import ChatTemplateError, ContentFormat, request_chat_template
from frontend.errors import BadRequestError
from frontend.generate.tool_calling import template_tool_calls
from frontend.multimodal.chat_media import MediaOptions, attach_media, media_refs, prepare_media
from frontend.protocol import MEDIA_PART_TYPES, ChatMessage, ChatTemplateFields, TextPart, text_only_message

if TYPE_CHECKING:
    from frontend.generate.protocol import ChatCompletionRequest
    from frontend.state import FrontendState


def message_for_template(message: ChatMessage, content_format: ContentFormat,
                         placeholder: Callable[[str], str] = lambda modality: "") -> dict[str, Any]:
    """One message as the template expects it: content as a string (a media part becomes the model's placeholder
    text where it stood), or as a list of parts (an image part becomes `{"type": "image"}`, a video part
    `{"type": "video"}`, as in transformers' templates)."""
    data = message.model_dump(exclude_none=True)
    parts = [{"type": "text", "text": message.content}] if isinstance(message.content, str) else [
        part.model_dump() if isinstance(part, TextPart) else {"type": MEDIA_PART_TYPES[part.type]}
        for part in message.content or []]
    if content_format == "string":
        data["content"] = "\n".join(part["text"] if part["type"] == "text" else placeholder(part["type"])
                                    for part in parts)
    else:
        data["content"] = parts
    return data


def check_images_allowed(frontend: FrontendState, fields: ChatTemplateFields, endpoint: str | None) -> None:
    """400 for media parts sent to a text-only model, or to an endpoint (`None`) that does not take them yet."""
    for index, message in enumerate(fields.messages):
        if not message.media_part_count():
            continue
        parts = message.content if isinstance(message.content, list) else []
        if frontend.vision is None:
            first = next(part.type for part in parts if part.type in MEDIA_PART_TYPES)
            raise BadRequestError(text_only_message(first, index), param="messages")
        if endpoint is None:
            raise BadRequestError("image and video parts in messages are accepted on /v1/chat/completions; this "
                                  "endpoint takes text only", param="messages")
        for part in parts:
            if part.type in MEDIA_PART_TYPES and getattr(part, part.type) is None:
                raise BadRequestError(f"messages[{index}] has a {part.type} part without its {part.type} value",
                                      param="messages")
            if part.type == "image_embeds" and not frontend.frontend_config.enable_mm_embeds:
                raise BadRequestError(f"messages[{index}] has an image_embeds part: precomputed embeddings are "
                                      "accepted only when the server runs with --enable-mm-embeds",
                                      param="messages")


def render_chat_prompt(frontend: FrontendState, fields: ChatTemplateFields,
                       tools: list[dict[str, Any]] | None | Literal["request"] = "request",
                       images_endpoint: str | None = None) -> str:
    """The prompt text for a chat request (400 if there is no template or it cannot render these messages).
    The request's own `chat_template` replaces the model's; `tools` replaces the request's tools. Image parts are
    refused unless the model takes images and `images_endpoint` names the endpoint that attaches them."""
    check_images_allowed(frontend, fields, images_endpoint)
    template = frontend.chat_template
    if fields.chat_template is not None:
        if not frontend.frontend_config.trust_request_chat_template:
            raise BadRequestError("Chat template is passed with request, but --trust-request-chat-template is not "
                                  "set. Refused request with untrusted chat template.", param="chat_template")
        try:
            template = request_chat_template(fields.chat_template, frontend.tokenizer.special_tokens)
        except ChatTemplateError as exc:
            raise BadRequestError(str(exc), param="chat_template") from exc
    if template is None:
        raise BadRequestError("this model has no chat template; pass --chat-template or use /v1/completions",
                              param="messages")
    vision = frontend.vision
    placeholder = vision.placeholder if vision is not None else (lambda modality: "")
    messages = [message_for_template(message, template.content_format, placeholder) for message in fields.messages]
    for index, message in enumerate(messages):
        template_tool_calls(message, index)
    try:
        return template.render(messages, add_generation_prompt=fields.add_generation_prompt,
                               continue_final_message=fields.continue_final_message,
                               tools=fields.tools if tools == "request" else tools,
                               documents=fields.documents, extra_kwargs=fields.chat_template_kwargs)
    except ChatTemplateError as exc:
        raise BadRequestError(str(exc), param="messages") from exc


async def attach_chat_media(frontend: FrontendState, request: ChatCompletionRequest,
                             token_ids: list[int]) -> tuple[list[int], list[MultiModalItem]]:
    """The rendered prompt's tokens with its media placeholders expanded, and the items for the engine (unchanged
    and none without media). `render_chat_prompt` has already refused media a model cannot take."""
    refs = media_refs(request.messages)
    vision = frontend.vision
    if not refs or vision is None:
        return token_ids, []
    for field, value in (("truncate_prompt_tokens", request.truncate_prompt_tokens),
                         ("use_beam_search", request.use_beam_search or None)):
        if value is not None:
            raise BadRequestError(f"{field} is not supported with images or video", param=field)
    prepared = await prepare_media(refs, vision, media_options(frontend, request))
    return attach_media(token_ids, prepared, vision)


def media_options(frontend: FrontendState, fields: ChatTemplateFields) -> MediaOptions:
    """The server's media rules and processing defaults (--mm-processor-kwargs, --media-io-kwargs) under the
    request's own."""
    config = frontend.frontend_config
    return MediaOptions(frontend.media, config.limit_mm_per_prompt, config.enable_mm_embeds, frontend.media_cache,
                        _merged(config.mm_processor_kwargs, fields.mm_processor_kwargs),
                        {modality: _merged(config.media_io_kwargs.get(modality), (fields.media_io_kwargs or {})
                                           .get(modality)) for modality in {*config.media_io_kwargs,
                                                                            *(fields.media_io_kwargs or {})}})


def _merged(defaults: Mapping[str, Any] | None, overrides: object) -> dict[str, Any] | None:
    if overrides is not None and not isinstance(overrides, Mapping):
        raise BadRequestError(f"media_io_kwargs entries are objects of options, got {overrides!r}",
                              param="media_io_kwargs")
    merged = {**(defaults or {}), **(overrides or {})}
    return merged or None
