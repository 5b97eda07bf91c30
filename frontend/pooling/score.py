"""POST /score, /v1/score (pairs of texts -> one relevance score each) and /rerank, /v1/rerank, /v2/rerank (a query
against documents, sorted by relevance).

Two kinds of model score:
- a cross-encoder (a classifier with one label): each (query, document) pair is one prompt, joined by the
  tokenizer's pair encoding (BERT: `[CLS] q [SEP] d [SEP]`, segment ids 0/1) or, with a score template
  (--score-template, or a request's `chat_template`), rendered from the messages `{"role": "query"}` and
  `{"role": "document"}` into one text;
- an embedding model: both sides are embedded and the score is their cosine similarity.

Sides pair up 1:1, 1:N (the one query against every document) or N:N (pairwise).
"""
from __future__ import annotations

import time
from typing import Any, Literal, Union

import numpy as np
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from engine_core.protocol import PoolingParams
from frontend.chat_template import ChatTemplate, ChatTemplateError
from frontend.errors import BadRequestError
from frontend.pooling.embedding import collect
from frontend.pooling.protocol import RerankRequest, ScoreRequest, ScoringFields
from frontend.pooling.serving import (PooledResult, PoolingPrompt, encoded_text, pooling_request_id, require_pooler,
                                      require_task, run_pooling, template_for_request, truncation_side, usage)
from frontend.state import FrontendState

RerankStyle = Literal["jina", "cohere"]


def pair_up(first: list[str], second: list[str]) -> list[tuple[str, str]]:
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


def _as_list(value: Union[str, list[str]]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


class ScoreServing:
    def __init__(self, frontend: FrontendState) -> None:
        self.frontend = frontend

    async def create_score(self, request: ScoreRequest, raw_request: Request) -> Response:
        self._check(request, "/score")
        request_id = pooling_request_id("score", request, raw_request.headers)
        outcome = await self._scores(request, _as_list(request.text_1), _as_list(request.text_2), request_id,
                                     raw_request)
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
        texts = request.document_texts
        outcome = await self._scores(request, [request.query], texts, request_id, raw_request)
        if isinstance(outcome, Response):
            return outcome
        scores, results = outcome
        order = sorted(range(len(scores)), key=lambda index: -scores[index])  # stable: ties keep input order
        top_n = request.top_n or len(texts)
        ranked = []
        for index in order[:top_n]:
            item: dict[str, Any] = {"index": index, "relevance_score": scores[index]}
            if request.return_documents:
                item["document"] = {"text": texts[index]}
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

    async def _scores(self, request: ScoringFields, first: list[str], second: list[str], request_id: str,
                      raw_request: Request) -> tuple[list[float], list[PooledResult]] | Response:
        pairs = pair_up(self._limit(first, request.max_tokens_per_query, request),
                        self._limit(second, request.max_tokens_per_doc, request))
        pooler = self.frontend.model_config.pooler
        assert pooler is not None
        if "score" in pooler.tasks:
            prompts = self._cross_encoder_prompts(request, pairs)
            params = PoolingParams(task="score", use_activation=request.use_activation)
            results = await collect(raw_request, run_pooling(self.frontend, request_id, request, prompts, params))
            if isinstance(results, Response):
                return results
            return [float(result.values.reshape(-1)[0]) for result in results], results
        texts = first + second
        prompts = [PoolingPrompt(encoded_text(self.frontend, request, text, "text_1" if index < len(first)
                                              else "text_2", index).token_ids) for index, text in enumerate(texts)]
        results = await collect(raw_request, run_pooling(self.frontend, request_id, request, prompts,
                                                         PoolingParams(task="embed")))
        if isinstance(results, Response):
            return results
        queries, documents = results[:len(first)], results[len(first):]
        return [cosine((queries[0] if len(queries) == 1 else queries[index]).values, document.values)
                for index, document in enumerate(documents)], results

    def _limit(self, texts: list[str], max_tokens: int, request: ScoringFields) -> list[str]:
        """vLLM's max_tokens_per_query / max_tokens_per_doc: cut each text of that side first (0: no limit)."""
        if not max_tokens:
            return texts
        side = truncation_side(self.frontend, request)
        return [self.frontend.tokenizer.truncate_text(text, max_tokens, side) for text in texts]

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
