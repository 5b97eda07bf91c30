"""Precomputed image embeddings (`image_embeds` parts, --enable-mm-embeds): decoded, checked against the model
and hashed; the prompt attaches them like an image whose encoder already ran."""
from __future__ import annotations

import base64
import binascii
import hashlib
from typing import TYPE_CHECKING

import numpy as np

from frontend.errors import BadRequestError
from frontend.multimodal.tensor_codec import TensorDecodeError, load_saved_tensor
from frontend.multimodal.vision_model import ImageFeatures

if TYPE_CHECKING:
    from frontend.multimodal.vision_model import VisionModel

_MAX_VALUES = 64 * 2**20  # 256 MiB of float32: far above any real image's embeddings


def precomputed_embeddings(value: str | dict[str, str], vision: VisionModel) -> tuple[ImageFeatures, str]:
    """([tokens, hidden] embeddings (sent as [tokens, hidden] or [1, tokens, hidden]), content hash); Qwen2-VL's
    come with their `image_grid_thw`."""
    encoded, grid_encoded = (value, None) if isinstance(value, str) else (value.get("image_embeds"),
                                                                          value.get("image_grid_thw"))
    if not isinstance(encoded, str):
        raise BadRequestError("image_embeds must be a base64 string, or an object with one under image_embeds",
                              param="messages")
    embeds = _tensor(encoded, "image_embeds")
    if embeds.ndim == 3 and embeds.shape[0] == 1:
        embeds = embeds[0]
    if embeds.ndim != 2 or embeds.shape[0] < 1 or embeds.shape[1] != vision.hidden_size:
        raise BadRequestError(f"image_embeds must have shape [tokens, {vision.hidden_size}] (the language model's "
                              f"width), got {list(embeds.shape)}", param="messages")
    grid = _grid(grid_encoded, embeds.shape[0], vision)
    digest = hashlib.sha256(b"image_embeds")
    digest.update(np.ascontiguousarray(embeds, dtype="<f4").tobytes())
    digest.update(repr(grid).encode())
    return ImageFeatures(embeds.astype(np.float32), int(embeds.shape[0]), grid), digest.hexdigest()


def _tensor(encoded: str, name: str) -> np.ndarray:
    try:
        return load_saved_tensor(base64.b64decode(encoded, validate=True), _MAX_VALUES)
    except (binascii.Error, ValueError) as exc:
        raise BadRequestError(f"{name}: {exc}" if isinstance(exc, TensorDecodeError) else
                              f"{name} is not valid base64", param="messages") from None


def _grid(encoded: str | None, num_tokens: int, vision: VisionModel) -> tuple[int, int, int] | None:
    """Qwen2-VL: the (t, h, w) patch grid the embeddings came from (its M-RoPE positions need it)."""
    if vision.grid_merge_size is None:
        return None
    if encoded is None:
        raise BadRequestError("this model's image_embeds need their image_grid_thw: send {\"image_embeds\": ..., "
                              "\"image_grid_thw\": ...}", param="messages")
    grid = _tensor(encoded, "image_grid_thw").reshape(-1)
    if grid.size != 3 or grid.min() < 1 or int(np.prod(grid)) != num_tokens * vision.grid_merge_size**2:
        raise BadRequestError(f"image_grid_thw {grid.tolist()} does not match {num_tokens} embeddings",
                              param="messages")
    return int(grid[0]), int(grid[1]), int(grid[2])
