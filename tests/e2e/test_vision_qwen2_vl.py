"""Qwen2-VL images through the real server (the tiny checkpoint, openai client): greedy text and prompt length equal
transformers' Qwen2VLForConditionalGeneration for one image, two images of different sizes, an image in an earlier
turn and a request's own `mm_processor_kwargs`, with 24-token prefill chunks that split the images; concurrent
image and text requests each get their own answer."""
from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.test_vision_chat import _data_url, _png
from tests.server_harness import ConveyorServer
from tests.workers.models.test_qwen2_vl import _reference, hf_greedy, qwen2_vl_inputs

MODEL = "tiny-qwen2-vl"
NEW_TOKENS = 8


def _hf_answer(model_dir: str, messages: list[dict[str, Any]], max_pixels: int | None = None) -> tuple[str, int]:
    """transformers' greedy text and prompt length for OpenAI-shaped messages (image parts as data: URLs)."""
    from PIL import Image

    images, template_messages = [], []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part["type"] == "image_url":
                    png = _png_of(part["image_url"]["url"])
                    images.append(Image.open(io.BytesIO(png)).convert("RGB"))
                    parts.append({"type": "image"})
                else:
                    parts.append(part)
            content = parts
        template_messages.append({"role": message["role"], "content": content})
    token_ids, _, inputs = qwen2_vl_inputs(model_dir, template_messages, images, max_pixels)
    new_ids, _ = hf_greedy(model_dir, inputs, NEW_TOKENS)
    _, tokenizer = _reference(model_dir)
    return tokenizer.decode(new_ids, skip_special_tokens=True), len(token_ids)


def _png_of(data_url: str) -> bytes:
    import base64

    return base64.b64decode(data_url.split(",", 1)[1])


def _user(pngs: list[bytes], text: str) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": _data_url(png)}} for png in pngs]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


CONVERSATIONS = {
    "one image": [_user([_png(1, 80, 60)], "What is in this picture?")],
    "two images": [_user([_png(2, 40, 90), _png(3, 200, 120)], "Compare them.")],
    "earlier turn": [_user([_png(4, 150, 100)], "Describe it."),
                     {"role": "assistant", "content": "A pattern of noise."},
                     {"role": "user", "content": [{"type": "text", "text": "What colour dominates?"}]}],
    "text only": [{"role": "user", "content": "Just text, no image."}],
}


@pytest.fixture(scope="module")
def model_dir(tiny_models: Path) -> str:
    return str(tiny_models / "qwen2_vl")


@pytest.fixture(scope="module")
def server(model_dir: str) -> Iterator[ConveyorServer]:
    server = ConveyorServer(model_dir, "--served-model-name", MODEL, "--max-model-len", "512",
                            "--kv-cache-memory", "64MiB", "--max-num-batched-tokens", "24")
    yield server
    assert server.stop() == []


def _chat(server: ConveyorServer, messages: list[dict[str, Any]], **extra: Any) -> Any:
    return server.openai_client().chat.completions.create(
        model=MODEL, messages=messages, max_tokens=NEW_TOKENS, temperature=0,
        extra_body={"ignore_eos": True, **extra})


@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_chat_matches_transformers(server: ConveyorServer, model_dir: str, case: str) -> None:
    answer = _chat(server, CONVERSATIONS[case])
    text, prompt_tokens = _hf_answer(model_dir, CONVERSATIONS[case])
    assert answer.choices[0].message.content == text
    assert answer.usage.prompt_tokens == prompt_tokens  # each image's own token count included


def test_mm_processor_kwargs_resize_like_transformers(server: ConveyorServer, model_dir: str) -> None:
    messages = [_user([_png(5, 200, 120)], "What is in this picture?")]
    small = _chat(server, messages, mm_processor_kwargs={"max_pixels": 56 * 56})
    text, prompt_tokens = _hf_answer(model_dir, messages, max_pixels=56 * 56)
    assert small.choices[0].message.content == text and small.usage.prompt_tokens == prompt_tokens
    assert prompt_tokens < _chat(server, messages).usage.prompt_tokens  # fewer image tokens than by default
    with pytest.raises(openai.BadRequestError) as refused:
        _chat(server, messages, mm_processor_kwargs={"max_pixels": 10**9})
    assert refused.value.body["param"] == "mm_processor_kwargs"  # type: ignore[index]


def test_concurrent_image_and_text_requests_each_get_their_own_answer(server: ConveyorServer,
                                                                      model_dir: str) -> None:
    conversations = [CONVERSATIONS[name] for name in CONVERSATIONS] * 3
    expected = {name: _hf_answer(model_dir, messages)[0] for name, messages in CONVERSATIONS.items()}

    async def together() -> list[Any]:
        client = server.async_openai_client()
        return list(await asyncio.gather(*[client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=NEW_TOKENS, temperature=0, extra_body={"ignore_eos": True})
            for messages in conversations]))

    answers = [answer.choices[0].message.content for answer in asyncio.run(together())]
    assert answers == [expected[name] for name in CONVERSATIONS] * 3


def test_an_image_shared_by_concurrent_requests_is_encoded_once(server: ConveyorServer, model_dir: str) -> None:
    """Four requests with the same new image run together: the encoder runs once for them (the engine core's
    encoder cache), once more for a different image, and not at all for a repeat the prefix cache covers."""
    png = _png(40, 120, 90)
    questions = ["What is it?", "Describe it.", "Which colour?", "How big?"]
    expected = [_hf_answer(model_dir, [_user([png], question)])[0] for question in questions]
    encoded = server.metric("conveyor:mm_encoder_items")

    async def together() -> list[Any]:
        client = server.async_openai_client()
        return list(await asyncio.gather(*[client.chat.completions.create(
            model=MODEL, messages=[_user([png], question)], max_tokens=NEW_TOKENS, temperature=0,
            extra_body={"ignore_eos": True}) for question in questions]))

    assert [answer.choices[0].message.content for answer in asyncio.run(together())] == expected
    assert server.metric("conveyor:mm_encoder_items") == encoded + 1
    _chat(server, [_user([_png(41, 120, 90)], questions[0])])
    assert server.metric("conveyor:mm_encoder_items") == encoded + 2
    repeat = _chat(server, [_user([png], questions[0])])
    assert repeat.choices[0].message.content == expected[0]
    assert repeat.usage.prompt_tokens_details.cached_tokens >= 32  # the image's blocks came from the prefix cache
    assert server.metric("conveyor:mm_encoder_items") == encoded + 2


def _video_data_url(frames: Any) -> str:
    import base64

    from tests.frontend.multimodal.test_video_processing import lossless_mkv

    return "data:video/x-matroska;base64," + base64.b64encode(lossless_mkv(frames)).decode()


def _hf_video_answer(model_dir: str, frames: Any, text: str, num_frames: int) -> tuple[str, int]:
    """transformers' greedy text for a video question. The pixel values are the frontend's processor's output,
    which tests/frontend/multimodal/test_video_processing.py shows bit-equal to transformers' video processor."""
    import json

    import numpy as np
    import torch

    from frontend.multimodal.processors import Qwen2VLVideoProcessor, VideoSampling, sample_frame_indices

    processor = Qwen2VLVideoProcessor.from_config(
        json.loads(Path(model_dir, "video_preprocessor_config.json").read_text()))
    sampled = frames[sample_frame_indices(len(frames), 24.0, VideoSampling(num_frames=num_frames))]
    inputs = processor.preprocess_video(sampled)
    model, tokenizer = _reference(model_dir)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pad = model.config.video_token_id
    token_ids: list[int] = []
    for token_id in tokenizer(prompt, add_special_tokens=False)["input_ids"]:
        token_ids.extend([token_id] * (inputs.num_tokens if token_id == pad else 1))
    input_ids = torch.tensor([token_ids])
    hf_inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                 "mm_token_type_ids": (input_ids == pad).int() * 2,
                 "pixel_values_videos": torch.from_numpy(np.asarray(inputs.pixel_values_videos)),
                 "video_grid_thw": torch.tensor([inputs.video_grid_thw])}
    new_ids, _ = hf_greedy(model_dir, hf_inputs, NEW_TOKENS)
    return tokenizer.decode(new_ids, skip_special_tokens=True), len(token_ids)


def test_video_chat_matches_transformers(server: ConveyorServer, model_dir: str) -> None:
    from tests.frontend.multimodal.test_video_processing import frames_pattern

    frames = frames_pattern(9, 60, 80, seed=3)
    text = "What happens in this video?"
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": _video_data_url(frames)}},
                                             {"type": "text", "text": text}]}]
    for num_frames in (4, 6):  # media_io_kwargs choose how many frames are sampled
        answer = _chat(server, messages, media_io_kwargs={"video": {"num_frames": num_frames}})
        expected, prompt_tokens = _hf_video_answer(model_dir, frames, text, num_frames)
        assert answer.choices[0].message.content == expected and answer.usage.prompt_tokens == prompt_tokens
    image_answer = _chat(server, [_user([_png(1, 80, 60)], text)])
    assert image_answer.choices[0].message.content != expected  # the video's embeddings took part


def test_bad_videos_answer_400(server: ConveyorServer) -> None:
    from tests.frontend.multimodal.test_video_processing import zero_frame_video

    import base64

    def video_message(url: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": "?"}]}]

    no_frames = "data:video/x-matroska;base64," + base64.b64encode(zero_frame_video()).decode()
    garbage = "data:video/mp4;base64," + base64.b64encode(b"not a video at all").decode()
    for url in (no_frames, garbage):
        with pytest.raises(openai.BadRequestError) as refused:
            _chat(server, video_message(url))
        assert refused.value.body["param"] == "messages"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:
        _chat(server, video_message(garbage), media_io_kwargs={"video": {"num_frames": "many"}})
    assert refused.value.body["param"] == "media_io_kwargs"  # type: ignore[index]
    assert _chat(server, [{"role": "user", "content": "still serving"}]).choices[0].message.content


def test_image_embeds_need_enable_mm_embeds(server: ConveyorServer) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        _chat(server, [{"role": "user", "content": [{"type": "image_embeds", "image_embeds": "AAAA"},
                                                    {"type": "text", "text": "?"}]}])
    assert refused.value.body["param"] == "messages" and "--enable-mm-embeds" in str(refused.value)  # type: ignore[index]
