"""Image and video decoding and per-family preprocessing in numpy + Pillow + PyAV, equal to transformers' processors.

The frontend runs these (never torch): bytes -> `decode_image` / `decode_video` -> a family's `preprocess` /
`preprocess_video` -> arrays the request carries to the workers, plus the number of placeholder tokens each image
or video expands to.
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
from frontend.multimodal.processors.qwen2_vl_video import (
           Qwen2VLVideoInputs,
           Qwen2VLVideoProcessor,
)
from frontend.multimodal.processors.tensor_resize import resize_frames
from frontend.multimodal.processors.video_decode import (
           DecodedVideo,
           VideoDecodeError,
           VideoLimits,
           VideoSampling,
           decode_video,
           sample_frame_indices,
)

__all__ = ["DECODABLE_FORMATS", "ClipImageProcessor", "DecodedVideo", "ImageDecodeError", "Qwen2VLImageInputs",
           "Qwen2VLImageProcessor", "Qwen2VLVideoInputs", "Qwen2VLVideoProcessor", "VideoDecodeError",
           "VideoLimits", "VideoSampling", "decode_image", "decode_video", "llava_num_image_tokens",
           "resize_frames", "sample_frame_indices", "smart_resize"]
