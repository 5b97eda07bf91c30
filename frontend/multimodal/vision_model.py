"""What the frontend knows about a vision-language model: its placeholder tokens and its image preprocessing, read
from the model folder (config.json, preprocessor_config.json, processor_config.json) without transformers.

    LLaVA:     every image is `num_image_tokens` copies of <image> (a fixed-size CLIP crop)
    Qwen2-VL:  an image is resized to its own grid of 14-pixel patches; it takes grid_h * grid_w / 4 copies of
               <|image_pad|>, and its patches travel with their grid (the workers' M-RoPE needs it); a video's
               sampled frames, paired over time, take grid_t * grid_h * grid_w / 4 copies of <|video_pad|>
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from frontend.multimodal.processors import (ClipImageProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor,
                                           llava_num_image_tokens)

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger("conveyor.frontend")

_LLAVA_DEFAULT_IMAGE_TOKEN = "<image>"
_QWEN2_VL_IMAGE_TOKEN = "<|image_pad|>"
_QWEN2_VL_VIDEO_TOKEN = "<|video_pad|>"


@dataclass(frozen=True)
class ImageFeatures:
    """One image (or video) as the workers take it."""

    pixel_values: np.ndarray  # LLaVA: [3, S, S]; Qwen2-VL: [grid_t * grid_h * grid_w, 3 * 2 * 14 * 14]; float32
    num_tokens: int  # placeholder tokens it expands to
    grid_thw: tuple[int, int, int] | None  # Qwen2-VL's patch grid


@dataclass(frozen=True)
class VisionModel:
    """A model's image placeholder (`image_token`, one per image in the rendered prompt, expanded to each image's
    token count), its video placeholder where it takes videos, and their preprocessing."""

    image_token: str
    image_token_id: int
    processor: ClipImageProcessor | Qwen2VLImageProcessor
    processor_key: str  # the preprocessing settings, part of every item's content hash
    num_image_tokens: int | None = None  # fixed for LLaVA; None where each image has its own count
    image_placeholder: str = ""  # what a string-format chat template gets where an image part stood
    video_token: str | None = None
    video_token_id: int | None = None
    video_placeholder: str = ""
    video_processor: Qwen2VLVideoProcessor | None = None
    hidden_size: int = 0  # the language model's: the width of precomputed image embeddings
    grid_merge_size: int | None = None  # Qwen2-VL: patches per token side (precomputed embeddings need a grid)

    def placeholder(self, modality: str) -> str:
        return self.video_placeholder if modality == "video" else self.image_placeholder or self.image_token

    def video_features(self, frames: np.ndarray, mm_processor_kwargs: Mapping[str, Any] | None = None
                       ) -> ImageFeatures:
        """frames [T, H, W, 3] uint8 -> patches, grid and token count. Raises ValueError for bad kwargs."""
        assert self.video_processor is not None
        inputs = self.video_processor.with_overrides(mm_processor_kwargs).preprocess_video(frames)
        return ImageFeatures(inputs.pixel_values_videos, inputs.num_tokens, inputs.video_grid_thw)

    def image_features(self, image: Image.Image, mm_processor_kwargs: Mapping[str, Any] | None = None
                       ) -> ImageFeatures:
        """Raises ValueError for `mm_processor_kwargs` this model does not take."""
        if isinstance(self.processor, Qwen2VLImageProcessor):
            inputs = self.processor.with_overrides(mm_processor_kwargs).preprocess(image)
            return ImageFeatures(inputs.pixel_values, inputs.num_tokens, inputs.grid_thw)
        if mm_processor_kwargs:
            raise ValueError("this model takes no mm_processor_kwargs: its images are a fixed-size crop")
        assert self.num_image_tokens is not None
        return ImageFeatures(self.processor.preprocess(image), self.num_image_tokens, None)


def load_vision_model(model_dir: str) -> VisionModel | None:
    """None for a model that takes no images (or a model file, not a folder)."""
    folder = Path(model_dir)
    config = _read_json(folder / "config.json")
    model_type = None if config is None else config.get("model_type")
    if config is None or model_type not in ("llava", "qwen2_vl"):
        return None
    preprocessor = _read_json(folder / "preprocessor_config.json")
    if preprocessor is None:
        raise ValueError(f"{model_dir} is a vision-language model without preprocessor_config.json: its images "
                         "cannot be prepared")
    key = json.dumps(preprocessor, sort_keys=True)
    if model_type == "qwen2_vl":
        video_preprocessor = _read_json(folder / "video_preprocessor_config.json") or preprocessor
        vision = VisionModel(image_token=_QWEN2_VL_IMAGE_TOKEN, image_token_id=int(config["image_token_id"]),
                             processor=Qwen2VLImageProcessor.from_config(preprocessor),
                             processor_key=key + json.dumps(video_preprocessor, sort_keys=True),
                             image_placeholder=f"<|vision_start|>{_QWEN2_VL_IMAGE_TOKEN}<|vision_end|>",
                             video_token=_QWEN2_VL_VIDEO_TOKEN, video_token_id=int(config["video_token_id"]),
                             video_placeholder=f"<|vision_start|>{_QWEN2_VL_VIDEO_TOKEN}<|vision_end|>",
                             video_processor=Qwen2VLVideoProcessor.from_config(video_preprocessor),
                             hidden_size=_text_hidden_size(config),
                             grid_merge_size=int(config.get("vision_config", {}).get("spatial_merge_size", 2)))
        logger.info("vision-language model: each image and video is its own number of %s / %s tokens",
                    vision.image_token, vision.video_token)
        return vision
    processor_config = _read_json(folder / "processor_config.json") or {}
    image_token = str(processor_config.get("image_token", _LLAVA_DEFAULT_IMAGE_TOKEN))
    vision = VisionModel(image_token=image_token, image_token_id=int(config.get("image_token_index", 32000)),
                         processor=ClipImageProcessor.from_config(preprocessor), processor_key=key,
                         num_image_tokens=llava_num_image_tokens(config), hidden_size=_text_hidden_size(config))
    logger.info("vision-language model: each image is %d %s tokens", vision.num_image_tokens, image_token)
    return vision


def _text_hidden_size(config: Mapping[str, Any]) -> int:
    return int((config.get("text_config") or {}).get("hidden_size") or config.get("hidden_size") or 0)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    value = json.loads(path.read_text(encoding="utf-8"))
    return value if isinstance(value, dict) else None
