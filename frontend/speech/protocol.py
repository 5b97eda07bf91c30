"""Schemas of the speech endpoints: the form fields of /v1/audio/transcriptions and /v1/audio/translations
(vLLM's names, multipart strings parsed by pydantic) and the /v1/realtime WebSocket events."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import ConfigDict, Field, ValidationError, model_validator

from frontend.errors import BadRequestError, validation_error
from frontend.protocol import INT64_MAX, INT64_MIN, OpenAIModel
from frontend.speech.upload import UploadedForm

AudioResponseFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]


class SpeechRequest(OpenAIModel):
    """Form fields shared by transcriptions and translations (the file itself travels beside them)."""

    model: Optional[str] = None
    prompt: str = ""
    response_format: AudioResponseFormat = "json"
    language: Optional[str] = None  # translations: the language of the audio (vLLM)
    temperature: float = Field(0.0, ge=0.0, le=1.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=INT64_MIN, le=INT64_MAX)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    stream: bool = False
    stream_include_usage: bool = False  # vLLM's flattened stream_options (form data has no nesting)
    stream_continuous_usage_stats: bool = False
    timestamp_granularities: list[Literal["word", "segment"]] = Field(
        default_factory=list, alias="timestamp_granularities[]")
    to_language: Optional[str] = None  # vLLM: Whisper only translates to English
    priority: int = 0
    request_id: Optional[str] = None

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_strings_are_unset(cls, data: Any) -> Any:
        """curl -F 'top_p=' sends an empty string: treat it as not given rather than as a parse error."""
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value != "" or key == "prompt"}
        return data

    @model_validator(mode="after")
    def _check_combinations(self) -> SpeechRequest:
        for name in ("stream_include_usage", "stream_continuous_usage_stats"):
            if getattr(self, name) and not self.stream:
                raise BadRequestError("stream options can only be given with stream=true", param=name)
        if "word" in self.timestamp_granularities:
            raise BadRequestError("word timestamps are not supported; use timestamp_granularities[]=segment",
                                  param="timestamp_granularities[]")
        if self.timestamp_granularities and self.response_format != "verbose_json":
            raise BadRequestError("timestamp_granularities needs response_format verbose_json",
                                  param="timestamp_granularities[]")
        if self.stream and self.response_format not in ("json", "text"):
            raise BadRequestError(f"response_format {self.response_format} cannot be streamed: stream=true sends "
                                  "text deltas (use response_format json or text)", param="response_format")
        if self.to_language is not None and self.to_language.strip().lower() not in ("en", "english"):
            raise BadRequestError("Whisper translates to English only (to_language 'en')", param="to_language")
        return self

    @classmethod
    def from_form(cls, form: UploadedForm) -> SpeechRequest:
        values = form.values(list_fields=("timestamp_granularities[]", "timestamp_granularities"))
        if "timestamp_granularities" in values:  # some clients leave out the brackets
            values.setdefault("timestamp_granularities[]", values.pop("timestamp_granularities"))
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None


# ---------------------------------------------------------------------------------------------- realtime events


def session_created(session_id: str, created: int) -> dict[str, Any]:
    return {"type": "session.created", "id": session_id, "created": created}


def transcription_delta(delta: str) -> dict[str, Any]:
    return {"type": "transcription.delta", "delta": delta}


def transcription_done(text: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"type": "transcription.done", "text": text,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def error_event(message: str, code: str) -> dict[str, Any]:
    """vLLM's realtime error event: the session stays open."""
    return {"type": "error", "error": message, "code": code}
