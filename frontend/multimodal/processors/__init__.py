"""Image decoding and per-family preprocessing in numpy + Pillow, equal to transformers' PIL-backend processors.

The frontend runs these (never torch): bytes -> `decode_image` -> a family's `preprocess` -> arrays the request
carries to the workers, plus the number of placeholder tokens each image expands to.
"""
from __future__ import annotations

from frontend.multimodal.processors.clip import (
           ClipImageProcessor,
           llava_num_image_tokens,
)
from frontend.multimodal.processors.decode import (
           DECODABLE_FORMATS,
           ImageDecodeError,
           decode_image,
)
from frontend.multimodal.processors.qwen2_vl import (
           Qwen2VLImageInputs,
           Qwen2VLImageProcessor,
           smart_resize,
)

__all__ = ["DECODABLE_FORMATS", "ClipImageProcessor", "ImageDecodeError", "Qwen2VLImageInputs",
           "Qwen2VLImageProcessor", "decode_image", "llava_num_image_tokens", "smart_resize"]
