"""Everything one frontend process holds for its lifetime, built once by `create_app` and kept in app.state."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_core.config import FrontendConfig, ModelConfig
from frontend.auth import ApiKeys
from frontend.chat_template import ChatTemplate, load_chat_template, load_score_template
from frontend.engine_client import EngineClient
from frontend.errors import BadRequestError, EngineDeadError, NotFoundError
from frontend.generation_config import EosConfig, load_generation_defaults
from frontend.metrics import FrontendMetrics
from frontend.multimodal.media_cache import ProcessedMediaCache
from frontend.multimodal.media_fetch import MediaFetchConfig
from frontend.multimodal.vision_model import VisionModel, load_vision_model
from frontend.speech.whisper import WhisperVocab, is_whisper
from frontend.tokenizer import TokenizerInfo

logger = logging.getLogger("conveyor.frontend")


@dataclass
class FrontendState:
    """Read-only after start-up; no per-request state lives here."""

    model_config: ModelConfig
    frontend_config: FrontendConfig
    engine: EngineClient
    tokenizer: TokenizerInfo
    chat_template: ChatTemplate | None
    generation_defaults: dict[str, Any]
    eos: EosConfig
    metrics: FrontendMetrics
    api_keys: ApiKeys  # --api-key / VLLM_API_KEY (frontend/auth.py checks them)
    created: int  # unix time of start-up, shown in /v1/models
    score_template: ChatTemplate | None = None  # --score-template: renders a (query, document) pair for /score
    speech: WhisperVocab | None = None  # set exactly for a Whisper (speech-to-text) model
    vision: VisionModel | None = None  # set for a model that takes images
    media: MediaFetchConfig = MediaFetchConfig()  # how image URLs may be fetched (--allowed-* flags, env limits)
    media_cache: ProcessedMediaCache | None = None  # recently processed media (--mm-processor-cache-gb)

    @classmethod
    def build(cls, model_config: ModelConfig, frontend_config: FrontendConfig,
              engine: EngineClient) -> FrontendState:
        tokenizer = TokenizerInfo(model_config.tokenizer_dir)
        eos = EosConfig.from_model(model_config, tokenizer)
        logger.info("eos_token_id %s, extra stop token ids %s", eos.eos_token_id, list(eos.extra_stop_token_ids))
        return cls(model_config=model_config, frontend_config=frontend_config, engine=engine,
                   tokenizer=tokenizer,
                   chat_template=load_chat_template(model_config, tokenizer.special_tokens),
                   generation_defaults=load_generation_defaults(model_config), eos=eos,
                   metrics=FrontendMetrics(model_config.served_model_name, lambda: engine.engine_stats),
                   api_keys=ApiKeys.resolve(frontend_config.api_key), created=int(time.time()),
                   score_template=load_score_template(model_config, tokenizer.special_tokens),
                   speech=_load_speech_vocab(model_config, tokenizer),
                   vision=load_vision_model(model_config.model),
                   media=MediaFetchConfig.from_env(frontend_config.allowed_local_media_path,
                                                   frontend_config.allowed_media_domains),
                   media_cache=(ProcessedMediaCache(int(frontend_config.mm_processor_cache_gb * 2**30))
                                if frontend_config.mm_processor_cache_gb > 0 else None))

    @property
    def is_speech_model(self) -> bool:
        """A Whisper model: it serves /v1/audio/* and /v1/realtime, not the text endpoints."""
        return is_whisper(self.model_config.architecture)

    def require_speech(self, endpoint: str) -> WhisperVocab:
        """The model's Whisper vocabulary, or 400 naming the problem on a model that does not take audio."""
        if self.speech is None:
            raise BadRequestError(f"{endpoint} needs a speech-to-text model (WhisperForConditionalGeneration), but "
                                  f"this server serves {self.model_config.architecture}, which takes no audio",
                                  param="model")
        return self.speech

    def check_model(self, model: str | None) -> None:
        """404 for a model this server does not serve; a missing name means the served one."""
        if model and model not in (self.model_config.served_model_name, self.model_config.model):
            raise NotFoundError(f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def check_generative(self, endpoint: str) -> None:
        """400 for a text-generation endpoint on a pooling or speech model, naming the endpoints it serves instead."""
        config = self.model_config
        if self.is_speech_model:
            raise BadRequestError(f"{endpoint} takes text, but this is a speech-to-text model "
                                  f"({config.architecture}): use /v1/audio/transcriptions, /v1/audio/translations "
                                  "or the /v1/realtime WebSocket", param="model")
        if config.runner != "pooling":
            return
        tasks = config.pooler.tasks if config.pooler is not None else ()
        endpoints = ("/v1/embeddings, /pooling, /score and /rerank" if "embed" in tasks
                     else "/classify, /pooling" + (", /score and /rerank" if "score" in tasks else ""))
        raise BadRequestError(f"{endpoint} generates text, but this model is served with --runner pooling: use "
                              f"{endpoints}", param="model")

    def check_engine_alive(self) -> None:
        if self.engine.is_dead:
            raise EngineDeadError(f"the engine is not available ({self.engine.dead_reason})")


def _load_speech_vocab(model_config: ModelConfig, tokenizer: TokenizerInfo) -> WhisperVocab | None:
    if not is_whisper(model_config.architecture):
        return None
    folders = [Path(model_config.tokenizer_dir), Path(model_config.model)]
    vocab = WhisperVocab.load(tokenizer, [folder for folder in folders if folder.is_dir()])
    logger.info("speech model: %s, decoder prompt starts %s", "multilingual" if vocab.multilingual else "English-only",
                vocab.decoder_prompt("transcribe", "en", []))
    return vocab
