"""Pydantic request schemas every API family shares, validated at the door: the OpenAI base model (unknown
fields accepted and logged), chat messages and the chat-template fields, and /tokenize, /detokenize.

Unknown fields are accepted (clients send newer OpenAI fields, or `extra_body` extras we do not implement) and
listed in one log line per request. Responses are plain dicts built by the serving code. Each API family keeps
its own schemas in its package (`frontend/generate/protocol.py`, `frontend/pooling/protocol.py`, ...).
"""
from __future__ import annotations

import logging
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from frontend.errors import BadRequestError

logger = logging.getLogger("conveyor.frontend")

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# Fields vLLM knows that Conveyor does not implement: a 400 naming them beats silently doing something else.
_UNSUPPORTED_VLLM_FIELDS = {
    "prompt_embeds": "prompt embeddings are not supported; send text or token ids",
    "logits_processors": "per-request logits processor constructors are not supported; register a processor with "
                         "the server and select it with vllm_xargs (see the README)",
    "thinking_token_budget": "there is no reasoning parser here, so a thinking budget cannot be enforced",
    "guided_decoding_backend": "guided decoding always uses llguidance; remove the field",
}

class OpenAIModel(BaseModel):
    """Base: allow and log unknown fields; refuse the vLLM fields Conveyor does not implement."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_unknown_fields(self) -> OpenAIModel:
        if self.model_extra:
            for name in self.model_extra:
                if name in _UNSUPPORTED_VLLM_FIELDS and self.model_extra[name] is not None:
                    # Not a ValueError: it must reach the error handler as is, with its param.
                    raise BadRequestError(f"'{name}' is not supported: {_UNSUPPORTED_VLLM_FIELDS[name]}", param=name)
            logger.warning("%s: ignoring unknown field(s) %s", type(self).__name__, sorted(self.model_extra))
        return self


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ImageURL(OpenAIModel):
    url: str
    detail: Optional[str] = None  # OpenAI's "auto" | "low" | "high": accepted; the model's processor decides


class ImageURLPart(OpenAIModel):
    type: Literal["image_url"]
    image_url: Optional[ImageURL] = None  # required; checked with the model (a text-only model answers so first)

    @field_validator("image_url", mode="before")
    @classmethod
    def _url_as_string(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value  # vLLM accepts the bare URL too


class VideoURLPart(OpenAIModel):
    """vLLM's video part: `{"type": "video_url", "video_url": {"url": ...}}`."""

    type: Literal["video_url"]
    video_url: Optional[ImageURL] = None  # required; checked with the model


class ImageEmbedsPart(OpenAIModel):
    """vLLM's precomputed image embeddings (needs --enable-mm-embeds): `base64(torch.save(tensor))` of shape
    [tokens, hidden] (or [1, tokens, hidden]); for Qwen2-VL an object {"image_embeds": ..., "image_grid_thw": ...}."""

    type: Literal["image_embeds"]
    image_embeds: Optional[Union[str, dict[str, str]]] = None


ContentPart = Annotated[Union[TextPart, ImageURLPart, VideoURLPart, ImageEmbedsPart], Field(discriminator="type")]
_CHAT_PART_TYPES = ("text", "image_url", "video_url", "image_embeds")
MEDIA_PART_TYPES = {"image_url": "image", "video_url": "video", "image_embeds": "image"}  # part type -> modality


def text_only_message(part_type: Any, index: int | None = None) -> str:
    where = "a message" if index is None else f"messages[{index}]"
    return (f"{where} has a content part of type {part_type!r}: this model is text-only, so only text parts "
            "are accepted (no images, audio or video)")


class ChatMessage(OpenAIModel):
    """Extra keys (name, tool_calls, tool_call_id, reasoning_content, ...) pass through to the template."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: Optional[Union[str, list[ContentPart]]] = None

    @field_validator("content", mode="before")
    @classmethod
    def _known_part_types(cls, content: Any) -> Any:
        """Text and image parts parse here; whether the model takes images is the endpoint's question."""
        if isinstance(content, list):
            for part in content:
                part_type = part.get("type") if isinstance(part, dict) else type(part).__name__
                if part_type not in _CHAT_PART_TYPES:
                    raise ValueError(f"a message has a content part of type {part_type!r}: only "
                                     "text, image_url, video_url and image_embeds parts are supported (media on vision-language "
                                     "models only)")
        return content

    @model_validator(mode="after")
    def _log_unknown_fields(self) -> ChatMessage:
        return self  # extra message keys are expected (template variables), not worth a log line

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content if isinstance(part, TextPart))

    def media_part_count(self) -> int:
        return 0 if not isinstance(self.content, list) else sum(
            isinstance(part, (ImageURLPart, VideoURLPart, ImageEmbedsPart)) for part in self.content)


class ChatTemplateFields(OpenAIModel):
    messages: list[ChatMessage] = Field(..., min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    documents: Optional[list[dict[str, Any]]] = None
    chat_template: Optional[str] = None  # per request, instead of the model's
    chat_template_kwargs: Optional[dict[str, Any]] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None  # "none" | "auto" | "required" | a named function
    parallel_tool_calls: Optional[bool] = None
    media_io_kwargs: Optional[dict[str, Any]] = None
    mm_processor_kwargs: Optional[dict[str, Any]] = None

    @field_validator("messages", mode="before")
    @classmethod
    def _known_part_types(cls, messages: Any) -> Any:
        """Audio/video/other parts: a 400 for the `messages` parameter, naming the message. Image parts pass;
        `check_images_allowed` answers for models and endpoints that take none."""
        for index, message in enumerate(messages if isinstance(messages, list) else []):
            content = message.get("content") if isinstance(message, dict) else None
            for part in content if isinstance(content, list) else []:
                part_type = part.get("type") if isinstance(part, dict) else type(part).__name__
                if part_type not in _CHAT_PART_TYPES:
                    raise ValueError(f"messages[{index}] has a content part of type {part_type!r}: only "
                                     "text, image_url, video_url and image_embeds parts are supported (media on vision-language "
                                     "models only)")
        return messages

    @model_validator(mode="after")
    def _continue_final_message(self) -> ChatTemplateFields:
        """continue_final_message renders without the generation prompt; asking for both is an error (vLLM)."""
        if self.continue_final_message and self.add_generation_prompt:
            if "add_generation_prompt" in self.model_fields_set:
                raise BadRequestError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                                      param="continue_final_message")
            self.add_generation_prompt = False
        return self


class TokenizeCompletionRequest(OpenAIModel):
    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(ChatTemplateFields):
    model: Optional[str] = None
    add_special_tokens: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(OpenAIModel):
    model: Optional[str] = None
    tokens: list[int]
