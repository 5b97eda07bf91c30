"""Image decoding and preprocessing (frontend/multimodal/processors/) against transformers' PIL-backend processors.

Every case encodes a deterministic image, runs it through `decode_image` + our processor, and runs the same bytes
(opened by Pillow, untouched) through transformers' processor built from the same config dict.
"""
from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen2_vl
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)

from frontend.multimodal.processors import (
    ClipImageProcessor,
    ImageDecodeError,
    Qwen2VLImageProcessor,
    decode_image,
    llava_num_image_tokens,
    smart_resize,
)

TOLERANCE = 1e-5
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# llava-hf/llava-1.5-7b-hf's preprocessor_config.json; the 224 variant is openai/clip-vit-large-patch14's numbers
LLAVA_336 = {"crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
             "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
             "image_std": CLIP_STD, "resample": 3, "rescale_factor": 0.00392156862745098,
             "size": {"shortest_edge": 336}}
CLIP_224 = {**LLAVA_336, "crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 224}}
# Qwen/Qwen2-VL-2B-Instruct's preprocessor_config.json
QWEN2_VL = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}


def pattern(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise `[H, W, 3]` uint8, so resampling filters have edges and ramps to act on."""
    rows, cols = np.mgrid[0:height, 0:width]
    base = np.stack([rows * 255 / max(height - 1, 1), cols * 255 / max(width - 1, 1),
                     (rows + cols) % 64 * 4], axis=-1)
    noise = np.random.default_rng(seed).normal(0, 24, (height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def encode(image: Image.Image, image_format: str = "PNG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **params)
    return buffer.getvalue()


def rgba_image() -> bytes:
    pixels = pattern(120, 90, 4)
    alpha = np.random.default_rng(5).integers(0, 256, (120, 90, 1), dtype=np.uint8)
    return encode(Image.fromarray(np.concatenate([pixels, alpha], axis=-1), "RGBA"))


def palette_image(transparent: bool) -> bytes:
    image = Image.fromarray(pattern(64, 96, 6)).quantize(colors=32)
    return encode(image, transparency=3) if transparent else encode(image)


def animated_gif() -> bytes:
    frames = [Image.fromarray(pattern(50, 70, seed)).quantize(colors=64) for seed in (7, 8)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], transparency=0, duration=40)


IMAGES: dict[str, Callable[[], bytes]] = {
    "tiny_20x30": lambda: encode(Image.fromarray(pattern(20, 30, 0))),
    "photo_480x640_jpeg": lambda: encode(Image.fromarray(pattern(480, 640, 1)), "JPEG", quality=90),
    "wide_333x1000": lambda: encode(Image.fromarray(pattern(333, 1000, 2))),
    "tall_1000x333": lambda: encode(Image.fromarray(pattern(1000, 333, 3))),
    "grayscale": lambda: encode(Image.fromarray(pattern(77, 101, 9)[..., 0], "L")),
    "grayscale_alpha": lambda: encode(Image.fromarray(pattern(40, 52, 10)[..., :2], "LA")),
    "rgba": rgba_image,
    "palette": lambda: palette_image(transparent=False),
    "palette_transparent": lambda: palette_image(transparent=True),
    "animated_gif": animated_gif,
}


def reference_image(data: bytes) -> Image.Image:
    """The bytes as transformers would get them from a user: opened by Pillow, mode untouched."""
    return Image.open(io.BytesIO(data))


def max_diff(ours: np.ndarray, reference: np.ndarray) -> float:
    assert ours.dtype == np.float32 and ours.shape == reference.shape, (ours.shape, reference.shape)
    return float(np.abs(ours.astype(np.float64) - reference.astype(np.float64)).max())


# ---- decoding ----

@pytest.mark.parametrize("name", sorted(IMAGES))
def test_decode_gives_rgb_with_the_encoded_size(name: str) -> None:
    data = IMAGES[name]()
    image = decode_image(data)
    assert image.mode == "RGB" and image.size == reference_image(data).size


def test_decode_composites_rgba_onto_white_like_vllm() -> None:
    data = rgba_image()
    source = reference_image(data).convert("RGBA")
    pasted = Image.new("RGB", source.size, (255, 255, 255))
    pasted.paste(source, mask=source.split()[3])  # vLLM's rgba_to_rgb
    assert np.array_equal(np.asarray(decode_image(data)), np.asarray(pasted))


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
                                  encode(Image.fromarray(pattern(64, 64, 11)))[:300],
                                  b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"],
                         ids=["empty", "text", "png_signature_only", "truncated_png", "eps_not_allowed"])
def test_decode_refuses_non_images(data: bytes) -> None:
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        decode_image(data)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels; the pixel data never comes (a bomb's shape)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width,height", [(100_000, 100_000), (10_000, 10_000)],
                         ids=["over_twice_the_limit", "between_limit_and_twice"])
def test_decompression_bomb_raises_our_error_and_no_warning(width: int, height: int) -> None:
    # Pillow raises above 2 x MAX_IMAGE_PIXELS (89.5 M) but only warns between 1x and 2x (1e8 pixels here)
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < width * height
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageDecodeError, match="decompression bomb"):
            decode_image(png_header_only(width, height))
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_decode_limit_follows_max_image_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(Image.fromarray(pattern(40, 40, 12)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: in Pillow's warn-only band
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1600)
    assert decode_image(data).size == (40, 40)


# ---- CLIP / LLaVA ----

CLIP_CASES: dict[str, tuple[dict[str, Any], type]] = {
    "clip_224": (CLIP_224, CLIPImageProcessorPil),
    "llava_336": (LLAVA_336, LlavaImageProcessorPil),
    "llava_336_pad_to_square": ({**LLAVA_336, "do_pad": True}, LlavaImageProcessorPil),
    "crop_larger_than_resize": ({**CLIP_224, "size": {"shortest_edge": 100}, "crop_size": 128},
                                CLIPImageProcessorPil),
    "square_resize_bilinear_no_crop": ({**CLIP_224, "size": {"height": 200, "width": 150}, "resample": 2,
                                        "do_center_crop": False}, CLIPImageProcessorPil),
    "int_sizes_like_openai_clip_336": ({**CLIP_224, "size": 336, "crop_size": 336}, CLIPImageProcessorPil),
}


def clip_pair(case: str, image: str) -> tuple[np.ndarray, np.ndarray]:
    config, reference_class = CLIP_CASES[case]
    data = IMAGES[image]()
    ours = ClipImageProcessor.from_config(config).preprocess(decode_image(data))
    reference = reference_class(**config)(reference_image(data), return_tensors="np")["pixel_values"][0]
    return ours, reference


@pytest.mark.parametrize("image", sorted(IMAGES))
@pytest.mark.parametrize("case", sorted(CLIP_CASES))
def test_clip_pixel_values_match_transformers(case: str, image: str) -> None:
    ours, reference = clip_pair(case, image)
    assert max_diff(ours, reference) <= TOLERANCE


def test_clip_pixel_values_are_c_contiguous_chw() -> None:
    ours, _ = clip_pair("llava_336", "wide_333x1000")
    assert ours.shape == (3, 336, 336) and ours.flags.c_contiguous


def llava_config(strategy: str, image_size: int = 336, patch_size: int = 14) -> dict[str, Any]:
    vision = {"model_type": "clip_vision_model", "image_size": image_size, "patch_size": patch_size,
              "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "projection_dim": 16}
    text = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 64}
    return {"vision_config": vision, "text_config": text, "vision_feature_select_strategy": strategy,
            "vision_feature_layer": -2, "image_token_index": 63}


@pytest.mark.parametrize("strategy,image_size,patch_size,expected",
                         [("default", 336, 14, 576), ("full", 336, 14, 577), ("default", 224, 32, 49)])
def test_llava_image_tokens_equal_the_towers_feature_count(strategy: str, image_size: int, patch_size: int,
                                                           expected: int) -> None:
    torch = pytest.importorskip("torch")
    from transformers import LlavaConfig, LlavaModel

    config = llava_config(strategy, image_size, patch_size)
    torch.manual_seed(0)
    model = LlavaModel(LlavaConfig(**config)).eval()
    with torch.no_grad():
        features = model.get_image_features(torch.zeros(1, 3, image_size, image_size),
                                            vision_feature_layer=-2, vision_feature_select_strategy=strategy)
    assert llava_num_image_tokens(config) == features.pooler_output[0].shape[0] == expected


def test_llava_image_tokens_reject_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        llava_num_image_tokens({**llava_config("default"), "vision_feature_select_strategy": "cls_only"})


# ---- Qwen2-VL ----

QWEN_CASES: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
    "qwen2_vl_2b": (QWEN2_VL, None),
    "override_small_max_pixels": (QWEN2_VL, {"max_pixels": 64 * 28 * 28}),
    "override_min_and_max": (QWEN2_VL, {"min_pixels": 256 * 28 * 28, "max_pixels": 512 * 28 * 28}),
    "override_as_size": (QWEN2_VL, {"size": {"shortest_edge": 3136, "longest_edge": 100 * 28 * 28}}),
    "size_config_bilinear": ({**{k: v for k, v in QWEN2_VL.items() if not k.endswith("_pixels")},
                              "size": {"shortest_edge": 3136, "longest_edge": 200 * 28 * 28}, "resample": 2}, None),
}


def qwen_reference(config: dict[str, Any], overrides: dict[str, Any] | None) -> Qwen2VLImageProcessorPil:
    """vLLM applies mm_processor_kwargs by building the HF image processor with them (its __init__ path)."""
    overrides = dict(overrides or {})
    size = overrides.pop("size", None)
    if size is not None:
        overrides.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    return Qwen2VLImageProcessorPil(**{**config, **overrides})


@pytest.mark.parametrize("image", sorted(IMAGES))
@pytest.mark.parametrize("case", sorted(QWEN_CASES))
def test_qwen2_vl_patches_match_transformers(case: str, image: str) -> None:
    config, overrides = QWEN_CASES[case]
    data = IMAGES[image]()
    processor = Qwen2VLImageProcessor.from_config(config).with_overrides(overrides)
    ours = processor.preprocess(decode_image(data))
    reference_processor = qwen_reference(config, overrides)
    reference = reference_processor(reference_image(data), return_tensors="np")
    assert max_diff(ours.pixel_values, reference["pixel_values"]) <= TOLERANCE
    assert [list(ours.grid_thw)] == reference["image_grid_thw"].tolist()
    width, height = reference_image(data).size
    hf_patches = reference_processor.get_number_of_image_patches(height, width, {})
    assert ours.num_tokens == processor.num_image_tokens(height, width) == hf_patches // 4


@pytest.mark.parametrize("height,width", [(1, 1), (20, 30), (27, 29), (56, 56), (333, 1000), (1000, 333),
                                          (480, 640), (4000, 3000), (10, 1999), (2, 399), (7777, 41)])
@pytest.mark.parametrize("bounds", [(3136, 12845056), (3136, 64 * 784), (200 * 784, 1003520)])
def test_smart_resize_matches_transformers(height: int, width: int, bounds: tuple[int, int]) -> None:
    assert smart_resize(height, width, 28, *bounds) == hf_qwen2_vl.smart_resize(height, width, 28, *bounds)


def test_smart_resize_refuses_extreme_aspect_ratios() -> None:
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(2, 401, 28, 3136, 12845056)


def test_qwen2_vl_overrides_are_checked() -> None:
    processor = Qwen2VLImageProcessor.from_config(QWEN2_VL)
    assert processor.with_overrides(None) is processor and processor.with_overrides({}) is processor
    with pytest.raises(ValueError, match="unsupported mm_processor_kwargs"):
        processor.with_overrides({"max_pixel": 1000})
    with pytest.raises(ValueError, match="may not exceed"):
        processor.with_overrides({"max_pixels": QWEN2_VL["max_pixels"] + 1})
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        processor.with_overrides({"min_pixels": 10_000, "max_pixels": 5_000})
    with pytest.raises(ValueError, match="positive integer"):
        processor.with_overrides({"max_pixels": "lots"})


def test_qwen2_vl_layout_keeps_merge_blocks_contiguous() -> None:
    """Patch rows come block by block (merge_size x merge_size), each patch repeated over the temporal axis."""
    processor = Qwen2VLImageProcessor(do_normalize=False, do_rescale=False, do_resize=False)
    pixels = np.arange(56 * 84 * 3, dtype=np.uint32).reshape(56, 84, 3) % 251  # 4 x 6 patches of 14
    out = processor.preprocess(Image.fromarray(pixels.astype(np.uint8)))
    assert out.grid_thw == (1, 4, 6) and out.num_tokens == 6
    rows = out.pixel_values.reshape(24, 3, 2, 14, 14)
    assert np.array_equal(rows[:, :, 0], rows[:, :, 1])
    # row 2 is the first patch of the block's second row: pixel rows 14..27, columns 0..13
    assert np.array_equal(rows[2, :, 0], pixels[14:28, 0:14].transpose(2, 0, 1))
    # row 4 starts the next block to the right: columns 28..41
    assert np.array_equal(rows[4, :, 0], pixels[0:14, 28:42].transpose(2, 0, 1))
