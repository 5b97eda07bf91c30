"""Video bytes -> sampled RGB frames `[T, H, W, 3]` uint8, decoded with PyAV (FFmpeg's libraries, no subprocess).

Frames are picked the way vLLM's default video loader (its OpenCV backend) picks them, with vLLM's option names
(`media_io_kwargs={"video": {"num_frames": 8, "fps": 2}}`):

```
 n = total_num_frames
 n = min(n, num_frames)            if num_frames > 0   (-1: every frame; vLLM's VideoMediaIO default is 32)
 n = min(n, floor(duration * fps)) if fps > 0          (duration = total_num_frames / stream fps)
 n = max(n, 1)
 indices = range(total) if n == total else np.linspace(0, total - 1, n, dtype=int)
```

Untrusted bytes: the container is recognized from its magic bytes and opened with that one demuxer (FFmpeg never
probes, so playlist/concat demuxers that open other files or URLs are unreachable); frame size, the number of
frames decoded and the bytes of frames kept are bounded by `VideoLimits` before the work or memory is spent.
"""
from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from frontend.multimodal.processors.pixels import ByteArray

if TYPE_CHECKING:
    from av.container import InputContainer
    from av.video.stream import VideoStream

DEFAULT_NUM_FRAMES: Final = 32  # vLLM's VideoMediaIO default
SAMPLING_KEYS: Final = frozenset({"num_frames", "fps"})
MP4_BOX_TYPES: Final = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot")
MPEG_TS_PACKET_LEN: Final = 188


class VideoDecodeError(ValueError):
    """The bytes are not a video this server decodes, the video breaks a limit, or the sampling options are bad."""


@dataclass(frozen=True)
class VideoSampling:
    """Which frames to keep: `num_frames` spread evenly over the whole video (-1 = all), at most `fps` per second
    of video when `fps` > 0 (-1 = no cap). Invalid values raise VideoDecodeError."""

    num_frames: int = DEFAULT_NUM_FRAMES
    fps: float = -1

    def __post_init__(self) -> None:
        num_frames, fps = self.num_frames, self.fps
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not (num_frames == -1 or num_frames > 0):
            raise VideoDecodeError(f"num_frames must be a positive integer or -1 (all frames), got {num_frames!r}")
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not (fps == -1 or 0 < fps < math.inf):
            raise VideoDecodeError(f"fps must be a positive number or -1 (no cap), got {fps!r}")

    @classmethod
    def from_media_io_kwargs(cls, media_io_kwargs: Mapping[str, Any] | None,
                             default: VideoSampling | None = None) -> VideoSampling:
        """From vLLM-style `media_io_kwargs` (`{"video": {"num_frames": 8, "fps": 2}}`; other modalities' entries
        are not read). Keys absent there keep `default`'s values (this class's defaults when None)."""
        base = default or cls()
        video = (media_io_kwargs or {}).get("video")
        if video is None:
            return base
        if not isinstance(video, Mapping):
            raise VideoDecodeError(f'media_io_kwargs["video"] must be an object, got {video!r}')
        unknown = set(video) - SAMPLING_KEYS
        if unknown:
            raise VideoDecodeError(f'unsupported media_io_kwargs["video"] keys {sorted(unknown)}; '
                                   f"supported: {sorted(SAMPLING_KEYS)}")
        return cls(num_frames=video.get("num_frames", base.num_frames), fps=video.get("fps", base.fps))


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on the work and memory one video may cost (a hostile file cannot exceed them)."""

    max_frame_pixels: int = 4096 * 4096  # width * height of a frame (4K UHD is 3840 x 2160)
    max_total_frames: int = 18_000  # frames in the file, all decoded up to the last one kept (10 min at 30 fps)
    max_sampled_bytes: int = 1 << 30  # the kept frames as uint8 RGB: about 170 frames of 1080p


@dataclass(frozen=True)
class DecodedVideo:
    """Sampled frames and where they came from (transformers' `VideoMetadata` fields, as vLLM fills them)."""

    frames: ByteArray  # [num_sampled_frames, height, width, 3] uint8 RGB
    frame_indices: tuple[int, ...]  # each kept frame's index among all the video's frames
    total_num_frames: int
    fps: float  # the stream's average frame rate; 0.0 when the container does not say

    @property
    def duration(self) -> float:
        """Seconds, as vLLM computes it: total_num_frames / fps (0.0 when fps is unknown)."""
        return self.total_num_frames / self.fps if self.fps > 0 else 0.0

    def metadata(self) -> dict[str, Any]:
        """The metadata dict vLLM's loaders return next to the frames."""
        return {"total_num_frames": self.total_num_frames, "fps": self.fps, "duration": self.duration,
                "video_backend": "pyav", "frames_indices": list(self.frame_indices),
                "do_sample_frames": len(self.frame_indices) == self.total_num_frames}


def sample_frame_indices(total_num_frames: int, fps: float, sampling: VideoSampling) -> list[int]:
    """vLLM's OpenCV-backend choice of frames (see the module docstring); `fps` is the video's own frame rate."""
    if total_num_frames <= 0:
        raise VideoDecodeError("video has no frames")
    num_sampled = total_num_frames
    if sampling.num_frames > 0:
        num_sampled = min(num_sampled, sampling.num_frames)
    if sampling.fps > 0:
        duration = total_num_frames / fps if fps > 0 else 0.0
        num_sampled = min(num_sampled, math.floor(duration * sampling.fps))
    num_sampled = max(1, num_sampled)
    if num_sampled == total_num_frames:
        return list(range(total_num_frames))
    return [int(i) for i in np.linspace(0, total_num_frames - 1, num_sampled, dtype=int)]


def decode_video(data: bytes, sampling: VideoSampling | None = None,
                 limits: VideoLimits | None = None) -> DecodedVideo:
    """Decode `data` and keep the frames `sampling` picks; raise VideoDecodeError when it cannot be done.

    CPU-bound (every frame up to the last kept one is decoded): run it off the event loop. Thread-safe.
    """
    import av  # deferred: importing FFmpeg's libraries costs start-up time for servers that never see a video

    sampling = sampling or VideoSampling()
    limits = limits or VideoLimits()
    container_format = sniff_container(data)
    try:
        total_num_frames, fps, height, width = _probe(data, container_format, limits)
        indices = sample_frame_indices(total_num_frames, fps, sampling)
        _check_sampled_bytes(len(indices), height, width, limits)
        frames, kept = _decode_frames(data, container_format, indices, (height, width), limits)
    except VideoDecodeError:
        raise
    except (av.FFmpegError, OSError, EOFError, ValueError) as exc:
        raise VideoDecodeError(f"cannot decode video ({len(data)} bytes): {exc}") from exc
    if not kept:
        raise VideoDecodeError("video has no decodable frames")
    return DecodedVideo(frames[:len(kept)], tuple(kept), total_num_frames, fps)


def sniff_container(data: bytes) -> str:
    """The FFmpeg demuxer for `data`'s container, from its magic bytes; VideoDecodeError for anything else."""
    head = data[:16]
    if head[4:8] in MP4_BOX_TYPES:
        return "mov"  # FFmpeg's mov,mp4,m4a,3gp,3g2,mj2 demuxer (external data references stay off by default)
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"  # also WebM
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith(b"\x00\x00\x01\xba"):
        return "mpeg"
    if data[:1] == b"\x47" and data[MPEG_TS_PACKET_LEN:MPEG_TS_PACKET_LEN + 1] == b"\x47":
        return "mpegts"
    if head.startswith(b"FLV"):
        return "flv"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    raise VideoDecodeError(f"not a video this server decodes ({len(data)} bytes): expected MP4/MOV, WebM/Matroska, "
                           "AVI, MPEG-PS/TS, FLV, Ogg or animated GIF")


def _open(data: bytes, container_format: str) -> InputContainer:
    import av

    return av.open(io.BytesIO(data), mode="r", format=container_format)


def _video_stream(container: InputContainer) -> VideoStream:
    if not container.streams.video:
        raise VideoDecodeError("file has no video stream")
    return container.streams.video[0]


def _probe(data: bytes, container_format: str, limits: VideoLimits) -> tuple[int, float, int, int]:
    """(total_num_frames, fps, height, width) without decoding; frame size and count checked against `limits`."""
    with _open(data, container_format) as container:
        stream = _video_stream(container)
        width, height = stream.codec_context.width, stream.codec_context.height
        _check_frame_size(height, width, limits)
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        total_num_frames = stream.frames  # from the container's index; 0 when it does not record one (WebM)
        if total_num_frames <= 0:
            total_num_frames = _count_packets(container, stream, limits)
    if total_num_frames > limits.max_total_frames:
        raise VideoDecodeError(f"video has {total_num_frames} frames, over the limit of {limits.max_total_frames}")
    return total_num_frames, fps, height, width


def _count_packets(container: InputContainer, stream: VideoStream, limits: VideoLimits) -> int:
    """Frames counted as the stream's packets (demuxing only, no decoding); stops past the limit."""
    count = 0
    for packet in container.demux(stream):
        if packet.size > 0:  # the demuxer's final flush packet is empty
            count += 1
            if count > limits.max_total_frames:
                break
    return count


def _check_frame_size(height: int, width: int, limits: VideoLimits) -> None:
    if height <= 0 or width <= 0:
        raise VideoDecodeError(f"video has an empty frame size {width}x{height}")
    if height * width > limits.max_frame_pixels:
        raise VideoDecodeError(f"video frames of {width}x{height} pixels are over the limit of "
                               f"{limits.max_frame_pixels} pixels")


def _check_sampled_bytes(num_frames: int, height: int, width: int, limits: VideoLimits) -> None:
    sampled_bytes = num_frames * height * width * 3
    if sampled_bytes > limits.max_sampled_bytes:
        raise VideoDecodeError(f"{num_frames} frames of {width}x{height} need {sampled_bytes} bytes, over the limit "
                               f"of {limits.max_sampled_bytes}: ask for fewer frames (num_frames)")


def _decode_frames(data: bytes, container_format: str, indices: list[int], size: tuple[int, int],
                   limits: VideoLimits) -> tuple[ByteArray, list[int]]:
    """Decode in order up to the last wanted index, converting only wanted frames; a frame whose size changed
    mid-stream is scaled to the first size. Returns the frames buffer and the indices actually found (fewer than
    asked when the container's frame count overstated the stream, as vLLM tolerates)."""
    height, width = size
    frames = np.empty((len(indices), height, width, 3), dtype=np.uint8)  # [num_sampled, H, W, 3]
    wanted = set(indices)
    kept: list[int] = []
    with _open(data, container_format) as container:
        for index, frame in enumerate(container.decode(_video_stream(container))):
            if index > indices[-1] or index >= limits.max_total_frames:
                break
            if index not in wanted:
                continue
            _check_frame_size(frame.height, frame.width, limits)
            frames[len(kept)] = frame.to_ndarray(format="rgb24", width=width, height=height)  # [H, W, 3]
            kept.append(index)
    return frames, kept
