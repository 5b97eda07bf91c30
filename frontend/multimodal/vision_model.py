"""What the frontend knows about a vision-language model: its image placeholder and its image preprocessing, read
from the model folder (config.json, preprocessor_config.json, processor_config.json) without transformers."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frontend.multimodal.processors import ClipImageProcessor, llava_num_image_tokens

logger = logging.getLogger("conveyor.frontend")

_LLAVA_DEFAULT_IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class VisionModel:
    """LLaVA family: each image is one `image_token` in the rendered prompt, expanded to `num_image_tokens` copies
    of `image_token_id` whose embeddings the workers replace with the image's."""

    image_token: str
    image_token_id: int
    num_image_tokens: int
    processor: ClipImageProcessor
    processor_key: str  # the preprocessing settings, part of every image's content hash


def load_vision_model(model_dir: str) -> VisionModel | None:
    """None for a model that takes no images (or a model file, not a folder)."""
    folder = Path(model_dir)
    config = _read_json(folder / "config.json")
    if config is None or config.get("model_type") != "llava":
        return None
    preprocessor = _read_json(folder / "preprocessor_config.json")
    if preprocessor is None:
        raise ValueError(f"{model_dir} is a LLaVA model without preprocessor_config.json: its images cannot be "
                         "prepared")
    processor_config = _read_json(folder / "processor_config.json") or {}
    image_token = str(processor_config.get("image_token", _LLAVA_DEFAULT_IMAGE_TOKEN))
    vision = VisionModel(image_token=image_token, image_token_id=int(config.get("image_token_index", 32000)),
                         num_image_tokens=llava_num_image_tokens(config),
                         processor=ClipImageProcessor.from_config(preprocessor),
                         processor_key=json.dumps(preprocessor, sort_keys=True))
    logger.info("vision-language model: each image is %d %s tokens", vision.num_image_tokens, image_token)
    return vision


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    value = json.loads(path.read_text(encoding="utf-8"))
    return value if isinstance(value, dict) else None
