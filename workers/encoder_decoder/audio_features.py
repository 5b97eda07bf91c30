"""Whisper's log-mel features in torch, equal to transformers' `WhisperFeatureExtractor` (within float rounding).

    16 kHz float32 PCM, zero-padded (or cut) to 30 s = 480000 samples
      -> STFT (n_fft 400, hop 160, periodic Hann window, centered with reflect padding) -> |.|^2, last frame dropped
      -> Slaney-normalized mel filter bank (80 bins; 128 for large-v3) -> log10(max(x, 1e-10))
      -> max(x, max_over_window - 8) -> (x + 4) / 4                          = [num_mel_bins, 3000] per window
"""
from __future__ import annotations

import functools

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
WINDOW_SAMPLES = 30 * SAMPLE_RATE
NUM_FRAMES = WINDOW_SAMPLES // HOP_LENGTH  # 3000


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    mel = hz / (200.0 / 3)
    log_region = hz >= 1000.0
    mel[log_region] = 15.0 + np.log(hz[log_region] / 1000.0) / (np.log(6.4) / 27.0)
    return mel


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    hz = mel * (200.0 / 3)
    log_region = mel >= 15.0
    hz[log_region] = 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel[log_region] - 15.0))
    return hz


@functools.lru_cache(maxsize=4)
def mel_filters(num_mel_bins: int) -> np.ndarray:
    """[n_fft // 2 + 1, num_mel_bins] float64 triangular filters from 0 to 8 kHz, each scaled to unit area (Slaney
    norm), as librosa and transformers' `mel_filter_bank(norm="slaney", mel_scale="slaney")` build them."""
    fft_freqs = np.linspace(0, SAMPLE_RATE // 2, N_FFT // 2 + 1)  # [201]
    mel_edges = np.linspace(_hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([8000.0]))[0], num_mel_bins + 2)
    edges = _mel_to_hz(mel_edges)  # [num_mel_bins + 2] Hz
    widths = np.diff(edges)  # [num_mel_bins + 1]
    slopes = edges[None, :] - fft_freqs[:, None]  # [201, num_mel_bins + 2]
    down = -slopes[:, :-2] / widths[:-1]  # rising edge of each triangle
    up = slopes[:, 2:] / widths[1:]  # falling edge
    filters = np.maximum(0.0, np.minimum(down, up))  # [201, num_mel_bins]
    return filters * (2.0 / (edges[2:] - edges[:-2]))[None, :]


def pad_or_trim(samples: torch.Tensor) -> torch.Tensor:
    """[num_samples] -> [WINDOW_SAMPLES]: zeros after the audio, or its first 30 s."""
    if samples.shape[0] >= WINDOW_SAMPLES:
        return samples[:WINDOW_SAMPLES]
    return torch.nn.functional.pad(samples, (0, WINDOW_SAMPLES - samples.shape[0]))


def log_mel_features(windows: list[torch.Tensor], num_mel_bins: int, device: torch.device) -> torch.Tensor:
    """Float32 PCM windows (each [num_samples] at 16 kHz, at most 30 s) -> [N, num_mel_bins, 3000] float32 features,
    one independent window each (the -8 floor is taken per window)."""
    audio = torch.stack([pad_or_trim(w.to(device=device, dtype=torch.float32)) for w in windows])  # [N, 480000]
    window = torch.hann_window(N_FFT, device=device)  # periodic, as transformers' window_function(400, "hann")
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)  # [N, 201, 3001]
    power = (stft[..., :-1].abs() ** 2).contiguous()  # [N, 201, 3000]
    filters = torch.from_numpy(mel_filters(num_mel_bins)).to(device=device, dtype=torch.float32)  # [201, mel]
    mel = filters.T @ power  # [N, mel, 3000]
    log_mel = torch.clamp(mel, min=1e-10).log10()
    floor = log_mel.amax(dim=(1, 2), keepdim=True) - 8.0  # [N, 1, 1]
    return (torch.maximum(log_mel, floor) + 4.0) / 4.0


def pcm_from_bytes(samples: bytes) -> torch.Tensor:
    """Little-endian float32 PCM bytes (`engine_core.protocol.AudioInput.samples`) -> [num_samples] float32."""
    if len(samples) % 4:
        raise ValueError(f"audio is {len(samples)} bytes: not a whole number of float32 samples")
    array = np.frombuffer(samples, dtype="<f4")
    if array.shape[0] > WINDOW_SAMPLES:
        raise ValueError(f"audio is {array.shape[0] / SAMPLE_RATE:.2f} s: at most 30 s fits one Whisper window")
    if not np.isfinite(array).all():
        raise ValueError("audio samples must be finite")
    return torch.from_numpy(array.astype(np.float32))
