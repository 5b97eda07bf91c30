"""Pydantic request schemas of the pooling endpoints, with vLLM's field names.

/v1/embeddings, /pooling and /classify take either `input` (text, texts, token ids, lists of token ids) or chat
`messages` (rendered with the chat template); `parse_pooling_request` picks the schema by the `messages` key.
/score takes two sides under any of vLLM's names (text_1/text_2, queries/documents, queries/items,
data_1/data_2); /rerank takes a query and documents. Score and rerank inputs are texts or vLLM's multimodal
`{"content": [parts]}` (image_url and text parts, on a vision-language model).
"""
from __future__ import annotations

from typing import Any, Literal, Optional, TypeVar, Union

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from engine_core.protocol import POOLING_TASKS
from frontend.errors import BadRequestError, validation_error
from frontend.pooling.encoding import EmbedDType, EncodingFormat, Endianness
from frontend.protocol import ChatTemplateFields, ContentPart, OpenAIModel

PoolingInput = Union[str, list[str], list[int], list[list[int]]]
PoolingTask = Literal["embed", "classify", "score", "token_embed", "token_classify"]
assert set(POOLING_TASKS) == set(PoolingTask.__args__)  # type: ignore[attr-defined]


class PoolingRequestBase(OpenAIModel):
    """Fields every pooling endpoint takes."""

    model: Optional[str] = None
    user: Optional[str] = None
    truncate_prompt_tokens: Optional[int] = Field(None, ge=-1)  # -1: the context length
    truncation_side: Optional[Literal["left", "right"]] = None  # "right" (default) keeps the beginning
    add_special_tokens: bool = True
    request_id: Optional[str] = None
    priority: int = 0
    cache_salt: Optional[str] = Field(None, min_length=1)
    mm_processor_kwargs: Optional[dict[str, Any]] = None

    @field_validator("mm_processor_kwargs")
    @classmethod
    def _text_only(cls, kwargs: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        if kwargs:
            raise ValueError("mm_processor_kwargs is not supported: the model's own processor settings apply")
        return kwargs


class EncodingFields(OpenAIModel):
    encoding_format: EncodingFormat = "float"
    embed_dtype: EmbedDType = "float32"  # base64 only
    endianness: Endianness = "native"  # base64 only


class EmbedFields(EncodingFields):
    dimensions: Optional[int] = Field(None, ge=1)
    normalize: Optional[bool] = None  # vLLM's older name of use_activation for embeddings
    use_activation: Optional[bool] = None  # embeddings: L2-normalize; class scores: softmax/sigmoid

    @property
    def embed_normalize(self) -> Optional[bool]:
        return self.normalize if self.normalize is not None else self.use_activation


class InputFields(OpenAIModel):
    input: PoolingInput

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: PoolingInput) -> PoolingInput:
        if isinstance(value, list) and (not value or any(isinstance(item, list) and not item for item in value)):
            raise ValueError("the input must not be empty")
        return value


class PoolingChatFields(ChatTemplateFields):
    """Chat `messages` rendered with the model's chat template; no generation prompt by default (vLLM)."""

    add_generation_prompt: bool = False
    add_special_tokens: bool = False  # the template writes the special tokens


class EmbeddingCompletionRequest(PoolingRequestBase, EmbedFields, InputFields):
    pass


class EmbeddingChatRequest(PoolingRequestBase, EmbedFields, PoolingChatFields):
    add_special_tokens: bool = False


class ClassifyFields(OpenAIModel):
    use_activation: Optional[bool] = None  # softmax (or sigmoid) over the logits; False: the raw logits


class ClassificationCompletionRequest(PoolingRequestBase, ClassifyFields, InputFields):
    pass


class ClassificationChatRequest(PoolingRequestBase, ClassifyFields, PoolingChatFields):
    add_special_tokens: bool = False


class PoolingTaskFields(EmbedFields):
    task: Optional[PoolingTask] = None  # None: token_embed for an embedding model, token_classify for a classifier


class PoolingCompletionRequest(PoolingRequestBase, PoolingTaskFields, InputFields):
    pass


class PoolingChatRequest(PoolingRequestBase, PoolingTaskFields, PoolingChatFields):
    add_special_tokens: bool = False


EmbeddingRequest = Union[EmbeddingCompletionRequest, EmbeddingChatRequest]
ClassificationRequest = Union[ClassificationCompletionRequest, ClassificationChatRequest]
PoolingRequest = Union[PoolingCompletionRequest, PoolingChatRequest]

_Completion = TypeVar("_Completion", bound=BaseModel)
_Chat = TypeVar("_Chat", bound=BaseModel)


def parse_pooling_request(body: dict[str, Any], completion_cls: type[_Completion],
                          chat_cls: type[_Chat]) -> _Completion | _Chat:
    """`messages` in the body: the chat schema; else the `input` one. Validation errors become one 400."""
    try:
        if "messages" in body:
            return chat_cls.model_validate(body)
        return completion_cls.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


# --------------------------------------------------------------------------- score and rerank


# vLLM's names for the two sides of /score, the first pair present wins.
_SCORE_SIDES = (("text_1", "text_2"), ("queries", "documents"), ("queries", "items"), ("data_1", "data_2"))


class ScoreMultiModal(OpenAIModel):
    """vLLM's ScoreMultiModalParam: `{"content": [image_url and text parts]}`. In a list of inputs it is one input
    (its parts together); given alone as a side, each part is an input of its own (vLLM's 1:N shape)."""

    content: list[ContentPart]


ScoreInput = Union[str, ScoreMultiModal]
ScoreInputs = Union[str, ScoreMultiModal, list[ScoreInput]]
ScoreItem = Union[str, list[ContentPart]]  # one input to embed or pair: a text, or content parts


def score_items(value: ScoreInputs) -> list[ScoreItem]:
    """A side of /score or /rerank as its inputs, in order."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, ScoreMultiModal):
        return [[part] for part in value.content]
    return [item if isinstance(item, str) else list(item.content) for item in value]


class ScoringFields(PoolingRequestBase):
    use_activation: Optional[bool] = None  # cross-encoder: sigmoid of the logit (False: the raw logit)
    chat_template: Optional[str] = None  # a score template for this request (needs --trust-request-chat-template)
    chat_template_kwargs: Optional[dict[str, Any]] = None
    max_tokens_per_query: int = Field(0, ge=0)  # 0: no per-side limit
    max_tokens_per_doc: int = Field(0, ge=0)


class ScoreRequest(ScoringFields):
    """`text_1` and `text_2` are canonical; the other names vLLM accepts are moved into them."""

    text_1: ScoreInputs
    text_2: ScoreInputs

    @model_validator(mode="before")
    @classmethod
    def _canonical_sides(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for first, second in _SCORE_SIDES:
            if first in data and second in data:
                data = dict(data)
                data["text_1"], data["text_2"] = data.pop(first), data.pop(second)
                return data
        raise BadRequestError("give the two sides to score as text_1 and text_2 (or queries and documents)",
                              param="text_1")


class RerankDocument(OpenAIModel):
    text: str


class RerankRequest(ScoringFields):
    query: ScoreInput
    documents: Union[ScoreMultiModal, list[Union[str, RerankDocument, ScoreMultiModal]]]
    top_n: Optional[int] = Field(None, ge=0)  # None or 0: every document
    return_documents: bool = True

    @field_validator("documents")
    @classmethod
    def _not_empty(cls, documents: Any) -> Any:
        if not (documents.content if isinstance(documents, ScoreMultiModal) else documents):
            raise ValueError("documents must not be empty")
        return documents

    @property
    def document_inputs(self) -> list[ScoreItem]:
        if isinstance(self.documents, ScoreMultiModal):
            return score_items(self.documents)
        return score_items([doc.text if isinstance(doc, RerankDocument) else doc for doc in self.documents])
