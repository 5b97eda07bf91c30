"""Video decoding and Qwen2-VL video preprocessing (frontend/multimodal/processors/) against the real thing.

Reference for preprocessing: transformers' own `Qwen2VLVideoProcessor.__call__` (its `_preprocess`, `resize`,
`rescale_and_normalize`, `patchify`, unchanged). transformers imports torchvision for it, and no torchvision that
loads with this CPU torch build exists here, so a subprocess installs, before importing transformers, a stand-in
`torchvision.transforms.v2.functional` whose `resize` and `normalize` are torchvision's tensor kernels
(`resize_image`, `normalize_image` in torchvision/transforms/v2/functional/_geometry.py and _misc.py) copied
statement for statement: the same native-uint8 decision, `torch.nn.functional.interpolate(mode, align_corners=False,
antialias=True)`, casts, clamp and round. Only torch does the arithmetic. Tolerance: 1e-5 absolute on every pixel
value (measured: 0.0, bit-identical), grids and placeholder counts exactly equal.

`resize_frames` is also compared directly with `torch.nn.functional.interpolate` on uint8 tensors (exactly equal).
Decoding is checked against the frames the test encoded itself (lossless codecs: exactly equal).
"""
from __future__ import annotations

import functools
import io
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import av
import numpy as np
import pytest
import torch

from frontend.multimodal.processors import (
    Qwen2VLVideoProcessor,
    VideoDecodeError,
    VideoLimits,
    VideoSampling,
    decode_video,
    resize_frames,
    sample_frame_indices,
)

TOLERANCE = 1e-5
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Qwen/Qwen2-VL-2B-Instruct's preprocessor_config.json, which transformers also builds the video processor from
QWEN2_VL = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}
# Run in a fresh interpreter: the stand-in must be in sys.modules before transformers first asks for torchvision.
REFERENCE_SCRIPT = r'''
import enum, importlib.machinery, json, sys, types
from pathlib import Path

import numpy as np
import torch
from torch.nn.functional import interpolate


class InterpolationMode(enum.Enum):  # torchvision's enum, values included
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _do_native_uint8_resize_on_cpu(interpolation):  # torchvision's, verbatim in effect
    if interpolation == InterpolationMode.BILINEAR:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return interpolation == InterpolationMode.BICUBIC


def resize(image, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
    """torchvision's resize_image (tensor kernel) for an explicit [height, width]."""
    assert max_size is None and len(size) == 2
    antialias = False if antialias is None else antialias
    align_corners = None
    if interpolation in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC):
        align_corners = False
    else:
        antialias = False
    shape = image.shape
    num_channels, old_height, old_width = shape[-3:]
    new_height, new_width = size
    if (new_height, new_width) == (old_height, old_width):
        return image
    dtype = image.dtype
    acceptable_dtypes = [torch.float32, torch.float64]
    if interpolation in (InterpolationMode.NEAREST, InterpolationMode.NEAREST_EXACT):
        acceptable_dtypes.append(torch.uint8)
    elif image.device.type == "cpu" and _do_native_uint8_resize_on_cpu(interpolation):
        acceptable_dtypes.append(torch.uint8)
    image = image.reshape(-1, num_channels, old_height, old_width)
    need_cast = dtype not in acceptable_dtypes
    if need_cast:
        image = image.to(dtype=torch.float32)
    image = interpolate(image, size=[new_height, new_width], mode=interpolation.value,
                        align_corners=align_corners, antialias=antialias)
    if need_cast:
        if interpolation == InterpolationMode.BICUBIC and dtype == torch.uint8:
            image = image.clamp_(min=0, max=255)
        if dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
            image = image.round_()
        image = image.to(dtype=dtype)
    return image.reshape(shape[:-3] + (num_channels, new_height, new_width))


def normalize(image, mean, std, inplace=False):
    """torchvision's normalize_image."""
    if not image.is_floating_point():
        raise TypeError(f"Input tensor should be a float tensor. Got {image.dtype}.")
    mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device)
    std = torch.as_tensor(std, dtype=image.dtype, device=image.device)
    if mean.ndim == 1:
        mean = mean.view(-1, 1, 1)
    if std.ndim == 1:
        std = std.view(-1, 1, 1)
    image = image.sub_(mean) if inplace else image.sub(mean)
    return image.div_(std)


def grayscale_to_rgb(image):
    if image.shape[-3] >= 3:
        return image
    raise NotImplementedError("the stand-in takes RGB only")


def _unsupported(*args, **kwargs):
    raise NotImplementedError("not part of the torchvision stand-in")


def _module(name):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec() finds it: transformers sees it
    module.__file__ = f"<stand-in {name}>"
    sys.modules[name] = module
    return module


torchvision = _module("torchvision")
torchvision.__version__ = "0.28.0"
torchvision.io = _module("torchvision.io")
torchvision.transforms = _module("torchvision.transforms")
torchvision.transforms.InterpolationMode = InterpolationMode
torchvision.transforms.functional = _module("torchvision.transforms.functional")
torchvision.transforms.functional.pil_to_tensor = _unsupported
torchvision.transforms.v2 = _module("torchvision.transforms.v2")
tvF = torchvision.transforms.v2.functional = _module("torchvision.transforms.v2.functional")
tvF.InterpolationMode = InterpolationMode
tvF.resize, tvF.normalize, tvF.grayscale_to_rgb = resize, normalize, grayscale_to_rgb
tvF.pad = tvF.crop = tvF.to_dtype = _unsupported

from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor  # noqa: E402

work = Path(sys.argv[1])
frames = np.load(work / "frames.npz")
outputs = {}
for name, case in json.loads((work / "cases.json").read_text()).items():
    processor = Qwen2VLVideoProcessor(**{"cap_pixels_per_frame": False, **case["init"]})
    result = processor(videos=[frames[name]], return_tensors="np", **case["call"])
    outputs[f"{name}.pixels"] = result["pixel_values_videos"]
    outputs[f"{name}.grid"] = result["video_grid_thw"]
np.savez(work / "outputs.npz", **outputs)
'''


def frames_pattern(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """`[T, H, W, 3]` uint8: gradients + noise that move per frame, and frame k's index in the top-left pixel."""
    rows, cols = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(num_frames):
        base = np.stack([(rows + 3 * k) * 255 / max(height - 1, 1), (cols * 2 + 5 * k) % 256,
                         (rows + cols + 7 * k) % 64 * 4], axis=-1)
        frame = np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
        frame[0, 0] = (k * 9) % 256
        frames.append(frame)
    return np.stack(frames)


def encode_video(frames: np.ndarray, container: str, codec: str, pix_fmt: str, rate: int = 24) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as output:
        stream = output.add_stream(codec, rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()


def lossless_mkv(frames: np.ndarray, rate: int = 24) -> bytes:
    return encode_video(frames, "matroska", "ffv1", "bgr0", rate)  # FFV1 in RGB: decodes to the same bytes


# ---------------------------------------------------------------- preprocessing parity with transformers

# name -> (frames, transformers init kwargs (= our from_config dict), call kwargs, our mm_processor_kwargs)
ParityCase = tuple[Callable[[], np.ndarray], dict[str, Any], dict[str, Any], dict[str, Any]]
PARITY_CASES: dict[str, ParityCase] = {
    "defaults_5x100x150_upscale": (lambda: frames_pattern(5, 100, 150, 0), {}, {}, {}),
    "defaults_4x240x320": (lambda: frames_pattern(4, 240, 320, 1), {}, {}, {}),
    "defaults_1x720x1280_downscale": (lambda: frames_pattern(1, 720, 1280, 2), {}, {}, {}),
    "defaults_3x480x270_portrait": (lambda: frames_pattern(3, 480, 270, 3), {}, {}, {}),
    "defaults_7x33x500_wide": (lambda: frames_pattern(7, 33, 500, 4), {}, {}, {}),
    "qwen2vl_3x57x91_tiny": (lambda: frames_pattern(3, 57, 91, 5), QWEN2_VL, {}, {}),
    "qwen2vl_2x224x336_no_resize": (lambda: frames_pattern(2, 224, 336, 6), QWEN2_VL, {}, {}),
    "qwen2vl_6x300x200": (lambda: frames_pattern(6, 300, 200, 7), QWEN2_VL, {}, {}),
    "override_max_pixels": (lambda: frames_pattern(5, 240, 320, 8), QWEN2_VL,
                            {"size": {"shortest_edge": 3136, "longest_edge": 28 * 28 * 16}},
                            {"max_pixels": 28 * 28 * 16}),
    "override_size_min_pixels": (lambda: frames_pattern(3, 60, 80, 9), QWEN2_VL,
                                 {"size": {"shortest_edge": 28 * 28 * 64, "longest_edge": 28 * 28 * 256}},
                                 {"size": {"shortest_edge": 28 * 28 * 64, "longest_edge": 28 * 28 * 256}}),
    "bilinear": (lambda: frames_pattern(4, 150, 250, 10), {**QWEN2_VL, "resample": 2}, {}, {}),
    "cap_pixels_per_frame": (lambda: frames_pattern(9, 360, 480, 11),
                             {"cap_pixels_per_frame": True, "max_video_tokens": 500}, {}, {}),
    "temporal_patch_3_pads_two": (lambda: frames_pattern(4, 112, 140, 12),
                                  {**QWEN2_VL, "temporal_patch_size": 3}, {}, {}),
    "no_normalize": (lambda: frames_pattern(2, 90, 120, 13), {**QWEN2_VL, "do_normalize": False}, {}, {}),
    "no_rescale": (lambda: frames_pattern(2, 90, 120, 14), {**QWEN2_VL, "do_rescale": False}, {}, {}),
    "decoded_mp4": (lambda: decode_video(encode_video(frames_pattern(10, 120, 176, 15), "mp4", "libx264",
                                                      "yuv420p"), VideoSampling(num_frames=5)).frames, {}, {}, {}),
}


@functools.cache
def case_frames(name: str) -> np.ndarray:
    """Each case's frames made once: an x264 encode may differ from run to run (its threads), and the reference
    must see the frames the test preprocesses."""
    return PARITY_CASES[name][0]()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[np.ndarray, list[int]]]:
    """transformers' outputs for every parity case, computed in one subprocess (see the module docstring)."""
    work = tmp_path_factory.mktemp("video_reference")
    np.savez(work / "frames.npz", **{name: case_frames(name) for name in PARITY_CASES})
    spec = {name: {"init": case[1], "call": case[2]} for name, case in PARITY_CASES.items()}
    (work / "cases.json").write_text(json.dumps(spec))
    (work / "reference.py").write_text(REFERENCE_SCRIPT)
    result = subprocess.run([sys.executable, str(work / "reference.py"), str(work)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    outputs = np.load(work / "outputs.npz")
    return {name: (outputs[f"{name}.pixels"], outputs[f"{name}.grid"].tolist()) for name in PARITY_CASES}


@pytest.mark.parametrize("name", list(PARITY_CASES))
def test_preprocess_video_equals_transformers(name: str, reference: dict[str, tuple[np.ndarray, list[int]]]) -> None:
    _, config, _, overrides = PARITY_CASES[name]
    frames = case_frames(name)
    processor = Qwen2VLVideoProcessor.from_config(config).with_overrides(overrides)
    ours = processor.preprocess_video(frames)
    expected_pixels, expected_grid = reference[name]
    assert [list(ours.video_grid_thw)] == expected_grid
    assert ours.pixel_values_videos.dtype == np.float32
    assert ours.pixel_values_videos.shape == expected_pixels.shape
    assert np.abs(ours.pixel_values_videos - expected_pixels).max() <= TOLERANCE
    grid_t, grid_h, grid_w = ours.video_grid_thw
    assert ours.num_tokens == grid_t * grid_h * grid_w // 4
    assert processor.num_video_tokens(*frames.shape[:3]) == ours.num_tokens


def test_overrides_change_the_grid_like_transformers(reference: dict[str, tuple[np.ndarray, list[int]]]) -> None:
    """Hand-checked: 240x320 under max 28*28*16 pixels -> smart_resize 84x112 -> (3, 6, 8) patches for 5 frames."""
    assert reference["override_max_pixels"][1] == [[3, 6, 8]]
    base = Qwen2VLVideoProcessor.from_config(QWEN2_VL)
    assert base.preprocess_video(frames_pattern(5, 240, 320, 8)).video_grid_thw == (3, 18, 22)  # 252x308
    assert base.with_overrides({"max_pixels": 28 * 28 * 16}).frame_size(5, 240, 320) == (84, 112)
    # the whole-video cap binds: 9 frames share int(500 * 28 * 28 * 0.9) * 2 pixels, floored at 1.05 * min_pixels
    assert reference["cap_pixels_per_frame"][1] == [[5, 20, 26]]
    assert Qwen2VLVideoProcessor.from_config({}).frame_size(9, 360, 480) == (364, 476)


def test_processor_config_errors() -> None:
    with pytest.raises(ValueError, match="do_sample_frames"):
        Qwen2VLVideoProcessor.from_config({"do_sample_frames": True})
    with pytest.raises(ValueError, match="bicubic"):
        Qwen2VLVideoProcessor.from_config({"resample": 1})
    processor = Qwen2VLVideoProcessor.from_config({})
    with pytest.raises(ValueError, match="unsupported mm_processor_kwargs"):
        processor.with_overrides({"fps": 2})
    with pytest.raises(ValueError, match="may not exceed"):
        processor.with_overrides({"max_pixels": processor.max_pixels + 1})
    with pytest.raises(ValueError, match="multiples of 28"):
        Qwen2VLVideoProcessor.from_config({"do_resize": False}).preprocess_video(frames_pattern(2, 30, 56, 0))
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        processor.preprocess_video(np.zeros((2, 28, 28), dtype=np.uint8))


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resize_frames_equals_torch_interpolate(mode: str) -> None:
    rng = np.random.default_rng(0)
    sizes = [(240, 320, 224, 308), (17, 23, 56, 56), (64, 64, 64, 128), (33, 47, 33, 19), (7, 300, 28, 840)]
    sizes += [tuple(int(v) for v in rng.integers(5, 200, 4)) for _ in range(12)]
    for in_h, in_w, out_h, out_w in sizes:
        frames = rng.integers(0, 256, (2, in_h, in_w, 3), dtype=np.uint8)
        tensor = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()  # [T, C, H, W], as transformers has it
        expected = torch.nn.functional.interpolate(tensor, size=[out_h, out_w], mode=mode, align_corners=False,
                                                   antialias=True).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(resize_frames(frames, out_h, out_w, mode), expected)


# ---------------------------------------------------------------- decoding and sampling

@pytest.mark.parametrize(("num_frames", "height", "width"), [(11, 48, 64), (5, 37, 53), (1, 90, 30)])
def test_decode_lossless_every_frame(num_frames: int, height: int, width: int) -> None:
    frames = frames_pattern(num_frames, height, width, 20)
    video = decode_video(lossless_mkv(frames), VideoSampling(num_frames=-1))
    np.testing.assert_array_equal(video.frames, frames)
    assert video.frame_indices == tuple(range(num_frames))
    assert (video.total_num_frames, video.fps) == (num_frames, 24.0)
    assert video.duration == pytest.approx(num_frames / 24)
    assert video.metadata()["do_sample_frames"] is True


@pytest.mark.parametrize(("total", "sampling", "expected"), [
    (11, VideoSampling(num_frames=4), [0, 3, 6, 10]),
    (11, VideoSampling(num_frames=32), list(range(11))),  # fewer frames than asked: all of them
    (9, VideoSampling(num_frames=-1), list(range(9))),
    (12, VideoSampling(num_frames=-1, fps=2), [0]),  # 0.5 s at 24 fps: floor(1.0) = 1 frame
    (48, VideoSampling(num_frames=-1, fps=10), np.linspace(0, 47, 20, dtype=int).tolist()),
    (48, VideoSampling(num_frames=8, fps=10), np.linspace(0, 47, 8, dtype=int).tolist()),  # the smaller wins
])
def test_sampling_is_vllms(total: int, sampling: VideoSampling, expected: list[int]) -> None:
    assert sample_frame_indices(total, 24.0, sampling) == expected
    frames = frames_pattern(total, 24, 32, 21)
    video = decode_video(lossless_mkv(frames), sampling)
    assert list(video.frame_indices) == expected
    np.testing.assert_array_equal(video.frames, frames[expected])


@pytest.mark.parametrize(("container", "codec", "pix_fmt"), [
    ("mp4", "libx264", "yuv420p"), ("webm", "libvpx", "yuv420p"), ("avi", "mjpeg", "yuvj420p"),
    ("mov", "png", "rgb24"),
])
def test_decode_common_containers(container: str, codec: str, pix_fmt: str) -> None:
    """Lossy codecs: right frames (the per-frame marker region), shape and count; webm records no frame count,
    so it is counted from packets."""
    frames = frames_pattern(9, 64, 96, 22)
    frames[:, :16, :16] = (np.arange(9) * 25)[:, None, None, None]  # a flat block survives compression
    video = decode_video(encode_video(frames, container, codec, pix_fmt), VideoSampling(num_frames=3))
    assert video.frames.shape == (3, 64, 96, 3) and video.total_num_frames == 9
    assert video.frame_indices == (0, 4, 8)
    assert np.abs(video.frames[:, 4:12, 4:12].astype(int) - frames[[0, 4, 8], 4:12, 4:12]).max() <= 8


def test_sampling_from_media_io_kwargs() -> None:
    assert VideoSampling.from_media_io_kwargs(None) == VideoSampling(num_frames=32, fps=-1)
    assert VideoSampling.from_media_io_kwargs({"video": {"num_frames": 8}, "image": {"x": 1}}).num_frames == 8
    assert VideoSampling.from_media_io_kwargs({"video": {"fps": 2}}, VideoSampling(num_frames=4)) == \
        VideoSampling(num_frames=4, fps=2)
    with pytest.raises(VideoDecodeError, match="unsupported"):
        VideoSampling.from_media_io_kwargs({"video": {"num_frame": 8}})
    with pytest.raises(VideoDecodeError, match="must be an object"):
        VideoSampling.from_media_io_kwargs({"video": 8})


@pytest.mark.parametrize("num_frames", [0, -2, 1.5, True, "8", None])
def test_bad_num_frames(num_frames: Any) -> None:
    with pytest.raises(VideoDecodeError, match="num_frames"):
        VideoSampling(num_frames=num_frames)


@pytest.mark.parametrize("fps", [0, -3, float("nan"), float("inf"), "2"])
def test_bad_fps(fps: Any) -> None:
    with pytest.raises(VideoDecodeError, match="fps"):
        VideoSampling(fps=fps)


def zero_frame_video() -> bytes:
    """A well-formed Matroska file whose video track has no frames (an audio track carries the data)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as output:
        video = output.add_stream("ffv1", rate=24)
        video.width, video.height, video.pix_fmt = 32, 32, "bgr0"
        audio = output.add_stream("pcm_s16le", rate=8000)
        audio.layout = "mono"
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        samples.sample_rate = 8000
        for packet in [*audio.encode(samples), *audio.encode()]:
            output.mux(packet)
    return buffer.getvalue()


@pytest.mark.parametrize(("data", "match"), [
    (lambda: b"definitely not a video" * 10, "not a video this server decodes"),
    (lambda: b"", "not a video this server decodes"),
    (lambda: b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n", "not a video this server decodes"),  # never probed
    (lambda: b"\x00\x00\x00\x18ftypisom" + bytes(300), "cannot decode video"),
    (lambda: lossless_mkv(frames_pattern(6, 32, 32, 0))[:120], "cannot decode video"),
    (zero_frame_video, "no frames"),
])
def test_undecodable(data: Callable[[], bytes], match: str) -> None:
    with pytest.raises(VideoDecodeError, match=match):
        decode_video(data())


def test_truncated_video_decodes_what_is_there_or_refuses() -> None:
    data = encode_video(frames_pattern(12, 48, 64, 23), "mp4", "libx264", "yuv420p")
    for cut in (len(data) // 3, len(data) // 2, len(data) - 50):
        try:
            video = decode_video(data[:cut], VideoSampling(num_frames=-1))
        except VideoDecodeError:
            continue
        assert 0 < len(video.frame_indices) <= 12 and video.frames.shape[0] == len(video.frame_indices)


@pytest.mark.parametrize(("limits", "match"), [
    (VideoLimits(max_total_frames=10), "11 frames, over the limit of 10"),
    (VideoLimits(max_frame_pixels=48 * 64 - 1), "over the limit of 3071 pixels"),
    (VideoLimits(max_sampled_bytes=11 * 48 * 64 * 3 - 1), "ask for fewer frames"),
])
def test_limits(limits: VideoLimits, match: str) -> None:
    data = lossless_mkv(frames_pattern(11, 48, 64, 24))
    with pytest.raises(VideoDecodeError, match=match):
        decode_video(data, VideoSampling(num_frames=-1), limits)


def test_frame_count_limit_holds_when_the_container_records_none() -> None:
    """WebM has no frame count in its header; the packet count stops at the limit."""
    data = encode_video(frames_pattern(11, 32, 32, 25), "webm", "libvpx", "yuv420p")
    with pytest.raises(VideoDecodeError, match="over the limit of 4"):
        decode_video(data, VideoSampling(num_frames=2), VideoLimits(max_total_frames=4))
