"""A chat request's images: fetched under the operator's rules, prepared off the event loop, and attached to the
tokenized prompt as `MultiModalItem`s at their placeholders.

    messages  --image_urls-->  URLs in message order  --prepare_images-->  pixel arrays + content hashes
    rendered prompt tokens:  ... USER: <image> \n What ...           (one placeholder token per image)
    --attach_images-->       ... USER: <image> x N \n What ...       (N = that image's token count)
                             + MultiModalItem(offset, N, pixels, hash) per image, in order
"""
from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine_core.protocol import MultiModalItem
from frontend.errors import BadRequestError
from frontend.multimodal.media_fetch import MediaFetchConfig, MediaFetchError, load_media_bytes
from frontend.multimodal.processors import ImageDecodeError, decode_image

if TYPE_CHECKING:
    from frontend.multimodal.vision_model import ImageFeatures, VisionModel
    from frontend.protocol import ChatMessage

DEFAULT_ITEMS_PER_PROMPT = 999  # vLLM's default --limit-mm-per-prompt per modality


@dataclass(frozen=True)
class PreparedImage:
    features: ImageFeatures
    content_hash: str


def image_urls(messages: list[ChatMessage]) -> list[str]:
    return [part.image_url.url for message in messages if isinstance(message.content, list)
            for part in message.content if part.type == "image_url" and part.image_url is not None]


async def prepare_images(urls: list[str], vision: VisionModel, media: MediaFetchConfig, limits: dict[str, int],
                         mm_processor_kwargs: Mapping[str, Any] | None = None) -> list[PreparedImage]:
    """Fetch, decode and preprocess every image (400 naming `messages` for any that cannot be, naming
    `mm_processor_kwargs` for settings the model does not take)."""
    limit = limits.get("image", DEFAULT_ITEMS_PER_PROMPT)
    if len(urls) > limit:
        raise BadRequestError(f"at most {limit} image(s) may be provided in one prompt (--limit-mm-per-prompt); "
                              f"this one has {len(urls)}", param="messages")
    return list(await asyncio.gather(*(_prepare(url, vision, media, mm_processor_kwargs) for url in urls)))


async def _prepare(url: str, vision: VisionModel, media: MediaFetchConfig,
                   mm_processor_kwargs: Mapping[str, Any] | None) -> PreparedImage:
    try:
        data = await load_media_bytes(url, "image", media)
        # decoding and resizing a large image takes tens of milliseconds: keep them off the event loop
        image = await asyncio.to_thread(decode_image, data)
    except (MediaFetchError, ImageDecodeError) as exc:
        raise BadRequestError(str(exc), param="messages") from None
    try:
        features = await asyncio.to_thread(vision.image_features, image, mm_processor_kwargs)
    except ValueError as exc:
        raise BadRequestError(str(exc), param="mm_processor_kwargs") from None
    digest = hashlib.sha256(data)
    digest.update(vision.processor_key.encode())
    digest.update(json.dumps(mm_processor_kwargs or {}, sort_keys=True, default=str).encode())
    return PreparedImage(features, digest.hexdigest())


def attach_images(token_ids: list[int], images: list[PreparedImage],
                  vision: VisionModel) -> tuple[list[int], list[MultiModalItem]]:
    """Expands each image placeholder token to the model's count and describes each image for the engine."""
    found = [index for index, token_id in enumerate(token_ids) if token_id == vision.image_token_id]
    if len(found) != len(images):
        raise BadRequestError(f"the prompt has {len(found)} {vision.image_token} placeholder(s) for {len(images)} "
                              f"image(s): give images as image_url parts, and do not write {vision.image_token} "
                              "in the text", param="messages")
    expanded: list[int] = []
    items: list[MultiModalItem] = []
    start = 0
    for position, image in zip(found, images, strict=True):
        expanded.extend(token_ids[start:position])
        pixels, num_tokens = np.ascontiguousarray(image.features.pixel_values, dtype="<f4"), image.features.num_tokens
        grid = None if image.features.grid_thw is None else list(image.features.grid_thw)
        items.append(MultiModalItem("image", pixels.tobytes(), list(pixels.shape), "float32", len(expanded),
                                    num_tokens, image.content_hash, grid_thw=grid))
        expanded.extend([vision.image_token_id] * num_tokens)
        start = position + 1
    expanded.extend(token_ids[start:])
    return expanded, items
