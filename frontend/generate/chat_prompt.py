"""Chat messages -> the prompt text, through the model's chat template (or the request's own, when trusted).

Chat completions, the Responses API, the pooling endpoints' chat inputs and /tokenize all render through here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from frontend.chat_template import ChatTemplateError, ContentFormat, request_chat_template
from frontend.errors import BadRequestError
from frontend.generate.tool_calling import template_tool_calls
from frontend.protocol import ChatMessage, ChatTemplateFields

if TYPE_CHECKING:
    from frontend.state import FrontendState


def message_for_template(message: ChatMessage, content_format: ContentFormat) -> dict[str, Any]:
    """One message as the template expects it: content as a string, or as a list of text parts."""
    data = message.model_dump(exclude_none=True)
    if content_format == "string":
        data["content"] = message.text()
    elif isinstance(message.content, str):
        data["content"] = [{"type": "text", "text": message.content}]
    else:
        data["content"] = [part.model_dump() for part in message.content or []]
    return data


def render_chat_prompt(frontend: FrontendState, fields: ChatTemplateFields,
                       tools: list[dict[str, Any]] | None | Literal["request"] = "request") -> str:
    """The prompt text for a chat request (400 if there is no template or it cannot render these messages).
    The request's own `chat_template` replaces the model's; `tools` replaces the request's tools."""
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
    messages = [message_for_template(message, template.content_format) for message in fields.messages]
    for index, message in enumerate(messages):
        template_tool_calls(message, index)
    try:
        return template.render(messages, add_generation_prompt=fields.add_generation_prompt,
                               continue_final_message=fields.continue_final_message,
                               tools=fields.tools if tools == "request" else tools,
                               documents=fields.documents, extra_kwargs=fields.chat_template_kwargs)
    except ChatTemplateError as exc:
        raise BadRequestError(str(exc), param="messages") from exc
