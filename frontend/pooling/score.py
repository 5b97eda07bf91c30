"""POST /score, /v1/score (pairs of texts -> one relevance score each) and /rerank, /v1/rerank, /v2/rerank (a query
against documents, sorted by relevance).

Two kinds of model score:
- a cross-encoder (a classifier with one label): each (query, document) pair is one prompt, joined by the
  tokenizer's pair encoding (BERT: `[CLS] q [SEP] d [SEP]`, segment ids 0/1) or, with a score template
  (--score-template, or a request's `chat_template`), rendered from the messages `{"role": "query"}` and
  `{"role": "document"}` into one text;
- an embedding model: both sides are embedded and the score is their cosine similarity.

Sides pair up 1:1, 1:N (the one query against every document) or N:N (pairwise). On a vision-language embedding
model an input may be vLLM's `{"content": [image_url and text parts]}`: it is embedded as one user message rendered
with the chat template, images attached (the embedding `/v1/embeddings` gives for the same message); a text input
is embedded as a plain text, as on any model.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Literal, TypeVar

import numpy as np
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from engine_core.protocol import PoolingParams
from frontend.chat_template import ChatTemplate, ChatTemplateError
from frontend.errors import BadRequestError
from frontend.pooling.embedding import collect
from frontend.pooling.protocol import (PoolingChatFields, RerankRequest, ScoreItem, ScoreRequest, ScoringFields,
                                       score_items)
from frontend.pooling.serving import (PooledResult, PoolingPrompt, chat_prompt, encoded_text, pooling_request_id,
                                      require_pooler, require_task, run_pooling, template_for_request,
                                      truncation_side, usage)
from frontend.protocol import ChatMessage
from frontend.state import FrontendState

RerankStyle = Literal["jina", "cohere"]
_Item = TypeVar("_Item")


def pair_up(first: list[_Item], second: list[_Item]) -> list[tuple[_Item, _Item]]:
    """1:1, 1:N or N:N; anything else is a 400."""
    if not first or not second:
        raise BadRequestError("both sides to score need at least one text", param="text_1" if not first else "text_2")
    if len(first) > 1 and len(first) != len(second):
        raise BadRequestError(f"the sides to score pair up 1:1, 1:N or N:N, not {len(first)}:{len(second)}",
                              param="text_2")
    return list(zip(first * len(second) if len(first) == 1 else first, second))


def cosine(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> float:
    a64, b64 = a.astype(np.float64).reshape(-1), b.astype(np.float64).reshape(-1)
    denominator = float(np.linalg.norm(a64) * np.linalg.norm(b64))
    return float(a64 @ b64) / denominator if denominator > 0 else 0.0


def returned_document(item: ScoreItem) -> dict[str, Any]:
    """A rerank result's `document`: `{"text"}`, or vLLM's `{"multi_modal": [parts]}` for content."""
    if isinstance(item, str):
        return {"text": item}
    return {"multi_modal": [part.model_dump(exclude_none=True) for part in item]}


class ScoreServing:
    def __init__(self, frontend: FrontendState) -> None:
        self.frontend = frontend

    async def create_score(self, request: ScoreRequest, raw_request: Request) -> Response:
        self._check(request, "/score")
        request_id = pooling_request_id("score", request, raw_request.headers)
        outcome = await self._scores(request, score_items(request.text_1), score_items(request.text_2),
                                     ("text_1", "text_2"), request_id, raw_request)
        if isinstance(outcome, Response):
            return outcome
        scores, results = outcome
        data = [{"index": index, "object": "score", "score": score} for index, score in enumerate(scores)]
        return JSONResponse({"id": request_id, "object": "list", "created": int(time.time()),
                             "model": self.frontend.model_config.served_model_name, "data": data,
                             "usage": usage(results)})

    async def rerank(self, request: RerankRequest, raw_request: Request, style: RerankStyle) -> Response:
        self._check(request, "/v2/rerank" if style == "cohere" else "/rerank")
        request_id = pooling_request_id("rerank", request, raw_request.headers)
        documents = request.document_inputs
        outcome = await self._scores(request, score_items([request.query]), documents, ("query", "documents"),
                                     request_id, raw_request)
        if isinstance(outcome, Response):
            return outcome
        scores, results = outcome
        order = sorted(range(len(scores)), key=lambda index: -scores[index])  # stable: ties keep input order
        top_n = request.top_n or len(documents)
        ranked = []
        for index in order[:top_n]:
            item: dict[str, Any] = {"index": index, "relevance_score": scores[index]}
            if request.return_documents:
                item["document"] = returned_document(documents[index])
            ranked.append(item)
        num_tokens = usage(results)["prompt_tokens"]
        if style == "cohere":
            return JSONResponse({"id": request_id, "results": ranked, "meta": {
                "api_version": {"version": "2"}, "billed_units": {"search_units": 1},
                "tokens": {"input_tokens": num_tokens, "output_tokens": 0}}})
        return JSONResponse({"id": request_id, "model": self.frontend.model_config.served_model_name,
                             "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
                             "results": ranked})

    def _check(self, request: ScoringFields, endpoint: str) -> None:
        frontend = self.frontend
        frontend.check_model(request.model)
        frontend.check_engine_alive()
        pooler = require_pooler(frontend, endpoint)
        if "score" not in pooler.tasks and "embed" not in pooler.tasks:
            require_task(frontend, "score", endpoint)  # a classifier with several labels: 400 naming its tasks

    async def _scores(self, request: ScoringFields, first: list[ScoreItem], second: list[ScoreItem],
                      params: tuple[str, str], request_id: str,
                      raw_request: Request) -> tuple[list[float], list[PooledResult]] | Response:
        """`params`: the two sides' names, for errors."""
        first = self._limit(self._checked(first, params[0]), request.max_tokens_per_query, request, params[0])
        second = self._limit(self._checked(second, params[1]), request.max_tokens_per_doc, request, params[1])
        pairs = pair_up(first, second)
        pooler = self.frontend.model_config.pooler
        assert pooler is not None
        if "score" in pooler.tasks:
            text_pairs = [(query, document) for query, document in pairs
                          if isinstance(query, str) and isinstance(document, str)]
            if len(text_pairs) < len(pairs):
                raise BadRequestError("image inputs are scored by an embedding model (--convert embed); this model "
                                      "is a cross-encoder, so give texts",
                                      param=params[1] if len(first) == 1 else params[0])
            prompts = self._cross_encoder_prompts(request, text_pairs)
            score_params = PoolingParams(task="score", use_activation=request.use_activation)
            results = await collect(raw_request, run_pooling(self.frontend, request_id, request, prompts,
                                                             score_params))
            if isinstance(results, Response):
                return results
            return [float(result.values.reshape(-1)[0]) for result in results], results
        prompts = list(await asyncio.gather(*(self._embed_prompt(request, item, params[0], index)
                                              for index, item in enumerate(first)),
                                            *(self._embed_prompt(request, item, params[1], index)
                                              for index, item in enumerate(second))))
        results = await collect(raw_request, run_pooling(self.frontend, request_id, request, prompts,
                                                         PoolingParams(task="embed")))
        if isinstance(results, Response):
            return results
        queries, documents = results[:len(first)], results[len(first):]
        return [cosine((queries[0] if len(queries) == 1 else queries[index]).values, document.values)
                for index, document in enumerate(documents)], results

    def _checked(self, items: list[ScoreItem], param: str) -> list[ScoreItem]:
        """Content inputs need a vision-language model, and something in them."""
        for index, item in enumerate(items):
            if isinstance(item, str):
                continue
            if self.frontend.vision is None:
                raise BadRequestError(f"{param} input {index} has content parts, but this model is text-only: give "
                                      "texts", param=param)
            if not item:
                raise BadRequestError(f"{param} input {index} has no content parts", param=param)
        return items

    async def _embed_prompt(self, request: ScoringFields, item: ScoreItem, param: str, index: int) -> PoolingPrompt:
        if isinstance(item, str):
            return PoolingPrompt(encoded_text(self.frontend, request, item, param, index).token_ids)
        # the parts were validated with the request: construct, since ChatMessage's validator reads raw dicts
        fields = PoolingChatFields(messages=[ChatMessage.model_construct(role="user", content=item)])
        try:
            return await chat_prompt(self.frontend, request, fields, "/score", param, index,
                                     add_special_tokens=False)  # the template writes them
        except BadRequestError as exc:  # the chat helpers name `messages`: name this request's field instead
            raise BadRequestError(exc.message, param=param if exc.param == "messages" else exc.param) from None

    def _limit(self, items: list[ScoreItem], max_tokens: int, request: ScoringFields,
               param: str) -> list[ScoreItem]:
        """vLLM's max_tokens_per_query / max_tokens_per_doc: cut each text of that side first (0: no limit)."""
        if not max_tokens:
            return items
        if any(not isinstance(item, str) for item in items):
            name = "max_tokens_per_query" if param in ("text_1", "query") else "max_tokens_per_doc"
            raise BadRequestError(f"{name} cannot cut an input with images", param=name)
        side = truncation_side(self.frontend, request)
        return [self.frontend.tokenizer.truncate_text(str(item), max_tokens, side) for item in items]

    def _cross_encoder_prompts(self, request: ScoringFields, pairs: list[tuple[str, str]]) -> list[PoolingPrompt]:
        template = template_for_request(self.frontend, request.chat_template) or self.frontend.score_template
        prompts = []
        for index, (query, document) in enumerate(pairs):
            if template is None:
                encoded = encoded_text(self.frontend, request, query, "text_1", index, pair=document)
                type_ids = encoded.token_type_ids if any(encoded.token_type_ids) else None
                prompts.append(PoolingPrompt(encoded.token_ids, type_ids))
                continue
            text = self._render(template, query, document, request)
            prompts.append(PoolingPrompt(encoded_text(self.frontend, request, text, "text_1", index).token_ids))
        return prompts

    @staticmethod
    def _render(template: ChatTemplate, query: str, document: str, request: ScoringFields) -> str:
        def message(role: str, text: str) -> dict[str, Any]:
            content: Any = text if template.content_format == "string" else [{"type": "text", "text": text}]
            return {"role": role, "content": content}

        try:
            return template.render([message("query", query), message("document", document)],
                                   add_generation_prompt=False, extra_kwargs=request.chat_template_kwargs)
        except ChatTemplateError as exc:
            raise BadRequestError(f"the score template failed: {exc}", param="chat_template") from exc
