"""Chat messages -> the prompt text, through the model's chat template (or the request's own, when trusted).

Chat completions, the Responses API, the pooling endpoints' chat inputs and /tokenize all render through here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from engine_core.protocol import MultiModalItem
from frontend.chat_template import ChatTemplateError, ContentFormat, request_chat_template
from frontend.errors import BadRequestError
from frontend.generate.tool_calling import template_tool_calls
from frontend.multimodal.chat_images import attach_images, image_urls, prepare_images
from frontend.protocol import ChatMessage, ChatTemplateFields, ImageURLPart, TextPart, text_only_message

if TYPE_CHECKING:
    from frontend.generate.protocol import ChatCompletionRequest
    from frontend.state import FrontendState


def message_for_template(message: ChatMessage, content_format: ContentFormat,
                         image_placeholder: str = "") -> dict[str, Any]:
    """One message as the template expects it: content as a string (an image part becomes the model's placeholder
    text where it stood), or as a list of parts (an image part becomes `{"type": "image"}`, as in transformers'
    templates)."""
    data = message.model_dump(exclude_none=True)
    parts = [{"type": "text", "text": message.content}] if isinstance(message.content, str) else [
        part.model_dump() if isinstance(part, TextPart) else {"type": "image"} for part in message.content or []]
    if content_format == "string":
        data["content"] = "\n".join(part["text"] if part["type"] == "text" else image_placeholder for part in parts)
    else:
        data["content"] = parts
    return data


def check_images_allowed(frontend: FrontendState, fields: ChatTemplateFields, endpoint: str | None) -> None:
    """400 for image parts sent to a text-only model, or to an endpoint (`None`) that does not take them yet."""
    for index, message in enumerate(fields.messages):
        if not message.image_part_count():
            continue
        if frontend.vision is None:
            raise BadRequestError(text_only_message("image_url", index), param="messages")
        if endpoint is None:
            raise BadRequestError("image parts in messages are accepted on /v1/chat/completions; this endpoint takes text only",
                                  param="messages")
        if any(isinstance(part, ImageURLPart) and part.image_url is None for part in message.content or []):
            raise BadRequestError(f"messages[{index}] has an image_url part without image_url.url", param="messages")


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
    placeholder = frontend.vision.image_token if frontend.vision is not None else ""
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


async def attach_chat_images(frontend: FrontendState, request: ChatCompletionRequest,
                             token_ids: list[int]) -> tuple[list[int], list[MultiModalItem]]:
    """The rendered prompt's tokens with its images' placeholders expanded, and the images for the engine
    (unchanged and none without images). `render_chat_prompt` has already refused images a model cannot take."""
    urls = image_urls(request.messages)
    vision = frontend.vision
    if not urls or vision is None:
        return token_ids, []
    for field, value in (("truncate_prompt_tokens", request.truncate_prompt_tokens),
                         ("use_beam_search", request.use_beam_search or None)):
        if value is not None:
            raise BadRequestError(f"{field} is not supported with images", param=field)
    images = await prepare_images(urls, vision, frontend.media, frontend.frontend_config.limit_mm_per_prompt,
                                  request.mm_processor_kwargs)
    return attach_images(token_ids, images, vision)
