"""A chat request's media (images, videos): fetched under the operator's rules, decoded and prepared off the event
loop, and attached to the tokenized prompt as `MultiModalItem`s at their placeholders.

    messages  --media_refs-->  (modality, URL) in message order  --prepare_media-->  arrays + content hashes
    rendered prompt tokens:  ... USER: <image> \\n What ...           (one placeholder token per item)
    --attach_media-->        ... USER: <image> x N \\n What ...       (N = that item's token count)
                             + MultiModalItem(offset, N, pixels, hash) per item, in order
"""
from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from engine_core.protocol import MultiModalItem
from frontend.errors import BadRequestError
from frontend.multimodal.media_cache import ProcessedMediaCache
from frontend.multimodal.media_fetch import MediaFetchConfig, MediaFetchError, load_media_bytes
from frontend.multimodal.precomputed import precomputed_embeddings
from frontend.multimodal.processors import ImageDecodeError, VideoDecodeError, VideoSampling, decode_image, decode_video

if TYPE_CHECKING:
    from frontend.multimodal.vision_model import ImageFeatures, VisionModel
    from frontend.protocol import ChatMessage

DEFAULT_ITEMS_PER_PROMPT = 999  # vLLM's default --limit-mm-per-prompt per modality


@dataclass(frozen=True)
class MediaRef:
    modality: Literal["image", "video"]
    url: str = ""
    embeds: str | dict[str, str] | None = None  # an image_embeds part's value instead of a URL


@dataclass(frozen=True)
class MediaOptions:
    """The operator's rules and a request's processing options (server defaults under the request's own)."""

    fetch: MediaFetchConfig
    limits: Mapping[str, int] = field(default_factory=dict)  # modality -> most items in one prompt
    enable_mm_embeds: bool = False
    cache: ProcessedMediaCache | None = None
    mm_processor_kwargs: Mapping[str, Any] | None = None
    media_io_kwargs: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class PreparedMedia:
    modality: str
    features: ImageFeatures
    content_hash: str
    precomputed: bool = False  # embeddings the client sent: the workers skip the encoder


def media_refs(messages: list[ChatMessage]) -> list[MediaRef]:
    refs = []
    for message in messages:
        for part in message.content if isinstance(message.content, list) else []:
            value = getattr(part, part.type, None)
            if value is not None and part.type in ("image_url", "video_url"):
                refs.append(MediaRef("image" if part.type == "image_url" else "video", value.url))
            elif value is not None and part.type == "image_embeds":
                refs.append(MediaRef("image", embeds=value))
    return refs


async def prepare_media(refs: list[MediaRef], vision: VisionModel, options: MediaOptions) -> list[PreparedMedia]:
    """Fetch, decode and preprocess every item (400 naming `messages` for any that cannot be, naming
    `mm_processor_kwargs` / `media_io_kwargs` for settings the model does not take)."""
    for modality in ("image", "video"):
        count, limit = sum(ref.modality == modality for ref in refs), options.limits.get(modality,
                                                                                           DEFAULT_ITEMS_PER_PROMPT)
        if count > limit:
            raise BadRequestError(f"at most {limit} {modality}(s) may be provided in one prompt "
                                  f"(--limit-mm-per-prompt); this one has {count}", param="messages")
    if any(ref.modality == "video" for ref in refs) and vision.video_processor is None:
        raise BadRequestError("this model takes images but not video: send image_url parts", param="messages")
    return list(await asyncio.gather(*(_prepare(ref, vision, options) for ref in refs)))


async def _prepare(ref: MediaRef, vision: VisionModel, options: MediaOptions) -> PreparedMedia:
    if ref.embeds is not None:
        if not options.enable_mm_embeds:  # checked with the messages already; kept here for every caller
            raise BadRequestError("image_embeds parts need --enable-mm-embeds", param="messages")
        features, content_hash = await asyncio.to_thread(precomputed_embeddings, ref.embeds, vision)
        return PreparedMedia("image", features, content_hash, precomputed=True)
    try:
        sampling = (VideoSampling.from_media_io_kwargs(options.media_io_kwargs) if ref.modality == "video"
                    else None)
    except VideoDecodeError as exc:
        raise BadRequestError(str(exc), param="media_io_kwargs") from None
    try:
        data = await load_media_bytes(ref.url, ref.modality, options.fetch)
    except MediaFetchError as exc:
        raise BadRequestError(str(exc), param="messages") from None
    digest = hashlib.sha256(data)
    digest.update(vision.processor_key.encode())
    digest.update(json.dumps([options.mm_processor_kwargs, sampling and sampling.__dict__], sort_keys=True,
                             default=str).encode())
    content_hash = digest.hexdigest()

    async def process() -> ImageFeatures:
        # decoding and resizing take tens of milliseconds (an image) to seconds (a video): off the event loop
        return await asyncio.to_thread(_features, data, vision, sampling, options.mm_processor_kwargs)

    try:
        features = await (options.cache.get_or_compute(content_hash, process) if options.cache is not None
                          else process())
    except (ImageDecodeError, VideoDecodeError) as exc:
        raise BadRequestError(str(exc), param="messages") from None
    except ValueError as exc:  # the processor refused the request's settings
        raise BadRequestError(str(exc), param="mm_processor_kwargs") from None
    return PreparedMedia(ref.modality, features, content_hash)


def _features(data: bytes, vision: VisionModel, sampling: VideoSampling | None,
              mm_processor_kwargs: Mapping[str, Any] | None) -> ImageFeatures:
    if sampling is None:
        return vision.image_features(decode_image(data), mm_processor_kwargs)
    return vision.video_features(decode_video(data, sampling).frames, mm_processor_kwargs)


def attach_media(token_ids: list[int], prepared: list[PreparedMedia],
                 vision: VisionModel) -> tuple[list[int], list[MultiModalItem]]:
    """Expands each placeholder token to its item's count and describes each item for the engine."""
    token_of = {"image": vision.image_token_id, "video": vision.video_token_id}
    queues = {modality: [item for item in prepared if item.modality == modality] for modality in token_of}
    for kind, queue in queues.items():
        found = sum(token_id == token_of[kind] for token_id in token_ids) if token_of[kind] is not None else 0
        if found != len(queue):
            token = vision.image_token if kind == "image" else vision.video_token
            raise BadRequestError(f"the prompt has {found} {token} placeholder(s) for {len(queue)} {kind}(s): "
                                  f"give media as {kind}_url parts, and do not write {token} in the text",
                                  param="messages")
    kind_of = {token_id: kind for kind, token_id in token_of.items() if token_id is not None}
    expanded: list[int] = []
    items: list[MultiModalItem] = []
    for token_id in token_ids:
        if token_id not in kind_of:
            expanded.append(token_id)
            continue
        media = queues[kind_of[token_id]].pop(0)
        pixels, num_tokens = np.ascontiguousarray(media.features.pixel_values, dtype="<f4"), media.features.num_tokens
        grid = None if media.features.grid_thw is None else list(media.features.grid_thw)
        items.append(MultiModalItem("image_embeds" if media.precomputed else media.modality, pixels.tobytes(), list(pixels.shape), "float32", len(expanded),
                                    num_tokens, media.content_hash, grid_thw=grid))
        expanded.extend([token_id] * num_tokens)
    return expanded, items
