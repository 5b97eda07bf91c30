"""Whisper in the model runner, on the tiny random checkpoint: log-mel features equal transformers'
WhisperFeatureExtractor, and greedy tokens equal `WhisperForConditionalGeneration.generate()` alone, batched with
interleaved decode steps, with chunked prefill, after preemption; a request without audio fails alone.

`speech_driver` (a RunnerDriver whose new requests carry audio) is shared with tests/workers/loading/test_ctranslate2.py.
"""
from __future__ import annotations

import os
from typing import Any

import msgspec
import numpy as np
import pytest
import torch

from engine_core.protocol import AudioInput, CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput
from tests.workers.harness import GREEDY, RunnerDriver, make_runner
from workers.encoder_decoder.audio_features import log_mel_features, mel_filters, pcm_from_bytes
from workers.encoder_decoder.requests import NO_AUDIO_ERROR
from workers.model_runner import ModelRunner
from workers.models.whisper import CrossAttentionBatch, CrossAttentionCache

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

SAMPLE_RATE = 16000
START, NO_TIMESTAMPS, START_OF_PREV, EOS = 50257, 50362, 50360, 50256  # tiny.en's tokenizer (the tiny model's)
DEFAULT_PROMPT = [START, NO_TIMESTAMPS]  # what generate() starts an English-only model with
NUM_NEW_TOKENS = 12


class _AudioRunner:
    """Puts each request's audio on its NewRequestData (RunnerDriver sends none)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner, self.block_size = runner, runner.block_size
        self.audio: dict[str, AudioInput | None] = {}

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        new = [msgspec.structs.replace(request, audio=self.audio.get(request.request_id))
               for request in scheduler_output.new_requests]
        return self.runner.execute(msgspec.structs.replace(scheduler_output, new_requests=new))


class SpeechDriver(RunnerDriver):
    def __init__(self, runner: ModelRunner, num_blocks: int) -> None:
        self.audio_runner = _AudioRunner(runner)
        super().__init__(self.audio_runner, num_blocks)  # type: ignore[arg-type]
        self.model_runner = runner

    def add_speech(self, request_id: str, samples: np.ndarray | None, prompt: list[int],
                   num_prompt_tokens: int | None = None) -> None:
        self.audio_runner.audio[request_id] = (None if samples is None
                                               else AudioInput(samples.astype("<f4").tobytes()))
        self.add(request_id, prompt, num_prompt_tokens=num_prompt_tokens)


def speech_driver(model_path: str, block_size: int = 16, num_blocks: int = 128) -> SpeechDriver:
    runner, _ = make_runner(model_path, block_size=block_size, num_blocks=num_blocks, max_model_len=448)
    return SpeechDriver(runner, num_blocks)


def hf_greedy(model: Any, samples: np.ndarray, max_new_tokens: int, **kwargs: Any) -> list[int]:
    """transformers' Whisper generate(), greedy: the generated tokens (its decoder prompt stripped), EOS kept."""
    from transformers import WhisperFeatureExtractor

    features = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)(
        samples, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    with torch.inference_mode():
        out = model.generate(features, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    tokens: list[int] = out[0].tolist()
    return tokens


def until_eos(tokens: list[int], eos: int = EOS) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


# --------------------------------------------------------------------------- audio


def noise(seconds: float, seed: int, scale: float = 0.3) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)


def tone(seconds: float, hz: float) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.5 * np.sin(2 * np.pi * hz * t) * np.exp(-t / 10)).astype(np.float32)


CLIPS = {"noise": noise(7.0, 0), "tone": tone(30.0, 440.0), "chirp": noise(2.5, 1, 0.05) + tone(2.5, 1000.0)}


@pytest.mark.parametrize("num_mel_bins", [80, 128])
def test_mel_filters_equal_transformers(num_mel_bins: int) -> None:
    from transformers.audio_utils import mel_filter_bank

    expected = mel_filter_bank(num_frequency_bins=201, num_mel_filters=num_mel_bins, min_frequency=0.0,
                               max_frequency=8000.0, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")
    np.testing.assert_allclose(mel_filters(num_mel_bins), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("num_mel_bins", [80, 128])
def test_log_mel_features_equal_feature_extractor(num_mel_bins: int) -> None:
    from transformers import WhisperFeatureExtractor

    clips = [*CLIPS.values(), np.zeros(1600, dtype=np.float32), noise(31.0, 2)]  # silence; > 30 s is cut
    expected = WhisperFeatureExtractor(feature_size=num_mel_bins)(
        clips, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    ours = log_mel_features([torch.from_numpy(clip) for clip in clips], num_mel_bins, torch.device("cpu"))
    assert ours.shape == (len(clips), num_mel_bins, 3000)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-4)


def test_pcm_from_bytes_checks_the_window() -> None:
    samples = CLIPS["noise"]
    assert torch.equal(pcm_from_bytes(samples.astype("<f4").tobytes()), torch.from_numpy(samples))
    with pytest.raises(ValueError, match="float32"):
        pcm_from_bytes(b"\x00" * 6)
    with pytest.raises(ValueError, match="30 s"):
        pcm_from_bytes(noise(30.5, 3).tobytes())
    with pytest.raises(ValueError, match="finite"):
        pcm_from_bytes(np.array([0.0, np.nan], dtype="<f4").tobytes())


# --------------------------------------------------------------------------- the tiny random model


@pytest.fixture(scope="module")
def whisper_path(tiny_models: Any) -> str:
    return str(tiny_models / "whisper")


@pytest.fixture(scope="module")
def hf_whisper(whisper_path: str) -> Any:
    from transformers import WhisperForConditionalGeneration

    return WhisperForConditionalGeneration.from_pretrained(whisper_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def expected(hf_whisper: Any) -> dict[str, list[int]]:
    return {name: hf_greedy(hf_whisper, clip, NUM_NEW_TOKENS) for name, clip in CLIPS.items()}


def test_reference_tokens_depend_on_the_audio(expected: dict[str, list[int]]) -> None:
    assert len({tuple(tokens) for tokens in expected.values()}) == len(CLIPS)


@pytest.mark.parametrize("name", list(CLIPS))
def test_alone_equals_transformers_generate(whisper_path: str, expected: dict[str, list[int]], name: str) -> None:
    driver = speech_driver(whisper_path)
    driver.add_speech(name, CLIPS[name], DEFAULT_PROMPT)
    driver.generate([name], NUM_NEW_TOKENS)
    assert driver.requests[name].output_token_ids == expected[name]


def test_batched_with_interleaved_decodes_equals_transformers(whisper_path: str, expected: dict[str, list[int]],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests start at different steps (an encoder run joins running decodes), one prefills in chunks of 1,
    one finishes early (its slot frees; a lone decode in a high slot attends through its own view), and a new
    request reuses the freed slot. Both decode paths (slot grid, per-request views) run."""
    build, paths = CrossAttentionBatch.build, set()

    def spy(query_start_loc: list[int], slots: list[int], device: torch.device) -> CrossAttentionBatch:
        batch = build(query_start_loc, slots, device)
        paths.update(["grid"] * (batch.grid_rows is not None) + ["views"] * any(e - s == 1 for s, e, _ in batch.spans))
        return batch

    monkeypatch.setattr(CrossAttentionBatch, "build", spy)
    driver = speech_driver(whisper_path, block_size=4)
    names = list(CLIPS)
    driver.add_speech(names[0], CLIPS[names[0]], DEFAULT_PROMPT)
    driver.generate([names[0]], 3)
    driver.add_speech(names[1], CLIPS[names[1]], DEFAULT_PROMPT)
    driver.add_speech(names[2], CLIPS[names[2]], DEFAULT_PROMPT)
    driver.step({names[0]: 1, names[1]: 2, names[2]: 1})  # names[2]: a partial prefill chunk
    driver.generate(names[:3], 5, chunk=1)
    driver.finish([names[0]])
    driver.generate([names[2]], 7)  # alone in slot 2 of 3
    driver.generate(names[1:], 8)
    driver.add_speech("again", CLIPS[names[0]], DEFAULT_PROMPT)  # takes the freed slot 0
    driver.generate(names[1:] + ["again"], NUM_NEW_TOKENS)
    assert driver.requests[names[0]].output_token_ids == expected[names[0]][:5]
    for name in names[1:]:
        assert driver.requests[name].output_token_ids == expected[name]
    assert driver.requests["again"].output_token_ids == expected[names[0]]
    assert paths == {"grid", "views"}


def test_previous_text_prompt_equals_transformers(whisper_path: str, hf_whisper: Any) -> None:
    """<|startofprev|> + earlier text, then the start sequence: generate(prompt_ids=...) builds the same prompt."""
    previous = [383, 2068, 2835, 6495]
    reference = hf_greedy(hf_whisper, CLIPS["chirp"], 8, prompt_ids=torch.tensor([START_OF_PREV, *previous]))
    driver = speech_driver(whisper_path, block_size=4)
    driver.add_speech("p", CLIPS["chirp"], [START_OF_PREV, *previous, *DEFAULT_PROMPT])
    driver.generate(["p"], 8, chunk=3)
    assert driver.requests["p"].output_token_ids == reference


def test_preempted_request_resumes(whisper_path: str, expected: dict[str, list[int]]) -> None:
    """Preemption: the core forgets the request and re-sends it (audio included) with its generated tokens."""
    driver = speech_driver(whisper_path)
    driver.add_speech("p", CLIPS["tone"], DEFAULT_PROMPT)
    driver.generate(["p"], 4)
    driver.finish(["p"])
    resumed = DEFAULT_PROMPT + expected["tone"][:4]
    driver.add_speech("p", CLIPS["tone"], resumed, num_prompt_tokens=len(DEFAULT_PROMPT))
    driver.generate(["p"], NUM_NEW_TOKENS - 4)
    assert driver.requests["p"].output_token_ids == expected["tone"][4:]
    cache = driver.model_runner.model.cross_cache  # type: ignore[union-attr]
    assert cache.capacity - len(cache.free_slots) == 1  # the first encoding's slot was freed


def test_request_without_audio_fails_alone(whisper_path: str, expected: dict[str, list[int]]) -> None:
    """Driven by hand: the driver expects a token from every request that reaches its end."""
    runner, _ = make_runner(whisper_path, num_blocks=16, max_model_len=448)
    audio = {"ok": AudioInput(CLIPS["noise"].tobytes()), "silent": None,
             "bad": AudioInput(b"\x00\x00\x80")}  # not whole float32 samples
    new = [NewRequestData(request_id, list(DEFAULT_PROMPT), 2, GREEDY, [i], 0, audio=audio[request_id])
           for i, request_id in enumerate(audio)]
    output = runner.execute(SchedulerOutput(new, [], {request_id: 2 for request_id in audio}, []))
    errors = output.request_errors or {}
    assert sorted(errors) == ["bad", "silent"] and errors["silent"] == NO_AUDIO_ERROR and "float32" in errors["bad"]
    assert output.sampled_token_ids == [[expected["noise"][0]], [], []]
    step = SchedulerOutput([], [CachedRequestData("ok", output.sampled_token_ids[0], [], 2)], {"ok": 1},
                           ["silent", "bad"])
    assert runner.execute(step).sampled_token_ids == [[expected["noise"][1]]]


def test_bfloat16_runs_and_profiling_frees_its_slots(whisper_path: str) -> None:
    runner, _ = make_runner(whisper_path, num_blocks=16, dtype="bfloat16", max_model_len=448)
    driver = SpeechDriver(runner, 16)
    driver.add_speech("x", CLIPS["noise"], DEFAULT_PROMPT)
    driver.generate(["x"], 3)
    assert len(driver.requests["x"].output_token_ids) == 3
    assert runner.encoder_decoder is not None
    cache = runner.model.cross_cache  # type: ignore[attr-defined]
    with torch.inference_mode():
        runner.encoder_decoder.profile()
    assert cache.capacity - len(cache.free_slots) == 1  # only "x" holds a slot


def test_decoder_positions_are_bounded(whisper_path: str) -> None:
    runner, _ = make_runner(whisper_path, num_blocks=32, max_model_len=512)
    prompt = DEFAULT_PROMPT + [220] * 447  # 449 tokens: one more than the decoder's 448 positions
    new = NewRequestData("long", prompt, len(prompt), GREEDY, list(range(29)), 0,
                         audio=AudioInput(CLIPS["chirp"].tobytes()))
    with pytest.raises(ValueError, match="448 positions"):
        runner.execute(SchedulerOutput([new], [], {"long": len(prompt)}, []))


def test_whisper_refuses_tensor_parallel(whisper_path: str) -> None:
    from workers.loading.loader import load_hf_config
    from workers.models import build_model

    with pytest.raises(ValueError, match="tensor parallel"):
        build_model(load_hf_config(whisper_path), whisper_path, torch.float32, torch.device("cpu"), 0, 2)


# --------------------------------------------------------------------------- cross-attention slots


def test_cross_attention_batch_groups_decodes_into_a_grid_when_dense() -> None:
    cpu = torch.device("cpu")
    dense = CrossAttentionBatch.build([0, 1, 4, 5], [2, 0, 1], cpu)  # decode, prefill (3 rows), decode
    assert dense.spans == [(1, 4, 0)] and dense.grid_size == 3
    assert dense.grid_rows is not None and dense.grid_rows.tolist() == [0, 4]
    assert dense.grid_slots is not None and dense.grid_slots.tolist() == [2, 1]
    sparse = CrossAttentionBatch.build([0, 1, 2], [7, -1], cpu)  # one decode in slot 7; no slot: no attention
    assert sparse.grid_rows is None and sparse.spans == [(0, 1, 7)]


def test_cross_attention_cache_reuses_slots_and_releases_when_empty() -> None:
    cache = CrossAttentionCache(num_layers=2, num_heads=1, head_dim=2, num_frames=3, dtype=torch.float32,
                                device=torch.device("cpu"))
    slots = [cache.allocate() for _ in range(5)]
    assert slots == [0, 1, 2, 3, 4] and cache.capacity == 8 and cache.keys[0].shape == (8, 1, 3, 2)
    cache.keys[1][4].fill_(1.0)
    cache.free(1)
    assert cache.allocate() == 1
    for slot in slots:
        cache.free(slot)
    assert cache.capacity == 0 and cache.keys == []


# --------------------------------------------------------------------------- timestamp rules


@pytest.mark.parametrize("max_initial", [50, None])
def test_timestamp_rules_equal_transformers_processor(max_initial: int | None) -> None:
    """EncoderDecoderRequests' timestamp rules, in one batch with a no-timestamp row, equal transformers'
    WhisperTimeStampLogitsProcessor row by row on outputs of every shape (pairs, single timestamps, text, none)
    and on logits where the timestamps' total probability sometimes beats every text token."""
    from types import SimpleNamespace

    from transformers import GenerationConfig
    from transformers.generation.logits_process import WhisperTimeStampLogitsProcessor

    from workers.encoder_decoder.requests import EncoderDecoderRequests
    from workers.sampling.state import make_sampling_state

    vocab_size, begin = 51864, NO_TIMESTAMPS + 1
    config = SimpleNamespace(suppress_tokens=[], begin_suppress_tokens=[], vocab_size=vocab_size, eos_token_id=EOS)
    requests = EncoderDecoderRequests(None, config, torch.device("cpu"))  # type: ignore[arg-type]
    requests.max_initial_timestamp_index = max_initial
    assert (requests.no_timestamps_id, requests.timestamp_begin) == (NO_TIMESTAMPS, begin)
    generation = GenerationConfig(no_timestamps_token_id=NO_TIMESTAMPS, eos_token_id=EOS,
                                  max_initial_timestamp_index=max_initial)
    rng = np.random.default_rng(0)
    outputs = [[], [begin], [begin, 400], [begin, 400, begin + 30], [begin, 400, begin + 30, begin + 30],
               [begin, 400, begin + 30, begin + 31, 7, 8], [begin + 5, 9, begin + 80, begin + 90, 11, begin + 120],
               [3, 4], [3, begin + 10]]
    for trial in range(4):
        prompt = [START] if trial % 2 else [START_OF_PREV, 100, 200, START]
        states = [make_sampling_state(GREEDY, prompt, list(output), EOS, "cpu") for output in outputs]
        states.append(make_sampling_state(GREEDY, prompt + [NO_TIMESTAMPS], [begin], EOS, "cpu"))  # untouched
        logits = torch.from_numpy(rng.normal(size=(len(states), vocab_size)).astype(np.float32))
        logits[:, begin:] += torch.from_numpy(rng.uniform(-3, 6, size=(len(states), 1)).astype(np.float32))
        before = logits.clone()
        requests.suppress(logits, states)
        assert torch.equal(logits[-1], before[-1])
        processor = WhisperTimeStampLogitsProcessor(generation, begin_index=len(prompt))
        for row, output in enumerate(outputs):
            input_ids = torch.tensor([prompt + output])
            assert torch.equal(logits[row], processor(input_ids, before[row:row + 1].clone())[0]), (trial, output)
        forced = sum(bool(torch.isinf(logits[row, :begin]).all()) for row in range(len(outputs)))
        assert 0 < forced < len(outputs)  # the total-probability rule fired on some rows, not on all


def test_language_detection_decodes_without_timestamp_rules() -> None:
    """A prompt without <|notimestamps|> that restricts allowed_token_ids (language detection) is left alone."""
    from types import SimpleNamespace

    from engine_core.protocol import SamplingParams
    from workers.encoder_decoder.requests import EncoderDecoderRequests
    from workers.sampling.state import make_sampling_state

    config = SimpleNamespace(suppress_tokens=[], begin_suppress_tokens=[], vocab_size=51865, eos_token_id=50257)
    requests = EncoderDecoderRequests(None, config, torch.device("cpu"))  # type: ignore[arg-type]
    assert requests.no_timestamps_id == 50363  # multilingual layout without a folder to read
    detection = make_sampling_state(SamplingParams(max_tokens=1, temperature=0.0, allowed_token_ids=[50259, 50260]),
                                    [50258], [], 50257, "cpu")
    transcription = make_sampling_state(GREEDY, [50258, 50259, 50359], [], 50257, "cpu")
    assert not requests.wants_timestamps(detection) and requests.wants_timestamps(transcription)
