"""Images in chat against transformers, through the real server: the tiny LLaVA served with
`--allowed-local-media-path`, images sent as data: and file:// URLs with the openai client. Greedy text equals
transformers' LlavaForConditionalGeneration on the same image bytes; the prefix cache reuses an image's blocks
only for the same image; the URL rules and the per-prompt limit answer 400s naming `messages`."""
from __future__ import annotations

import asyncio
import base64
import io
import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch

from tests.frontend.multimodal.test_media_fetch import PNG, base_url  # noqa: F401  (base_url: a fixture)
from tests.server_harness import ConveyorServer

MODEL = "tiny-llava"
MAX_MEDIA_BYTES = 200_000  # the test server's byte limit per image (CONVEYOR_MAX_MEDIA_BYTES)
NEW_TOKENS = 8
QUESTION = "What is in this picture?"


def _png(seed: int, width: int, height: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _messages(urls: list[str], text: str = QUESTION) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@lru_cache(maxsize=1)
def _reference(model_dir: str) -> tuple[Any, Any]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return (LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval(),
            AutoProcessor.from_pretrained(model_dir))


def _hf_answer(model_dir: str, pngs: list[bytes], text: str = QUESTION,
               new_tokens: int = NEW_TOKENS) -> tuple[str, int]:
    """transformers' greedy text and prompt length for the same images and question."""
    from PIL import Image

    model, processor = _reference(model_dir)
    content = [{"type": "image"}] * len(pngs) + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs]
    inputs = processor(images=images, text=[prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    new_ids = out[0, inputs["input_ids"].shape[1]:]
    return processor.tokenizer.decode(new_ids, skip_special_tokens=True), int(inputs["input_ids"].shape[1])


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    (folder / "cat.png").write_bytes(_png(1, 80, 60))
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.png").write_bytes(_png(2, 30, 30))
    os.symlink(outside / "secret.png", folder / "escape.png")
    return folder


@pytest.fixture(scope="module")
def llava_server(tiny_models: Path, media_dir: Path) -> Iterator[ConveyorServer]:
    server = ConveyorServer(str(tiny_models / "llava"), "--served-model-name", MODEL, "--max-model-len", "512",
                            "--kv-cache-memory", "64MiB", "--allowed-local-media-path", str(media_dir),
                            "--limit-mm-per-prompt", '{"image": 2}', "--enable-mm-embeds",
                            "--allowed-media-domains", "127.0.0.1", env={"VLLM_IMAGE_FETCH_TIMEOUT": "0.5", "CONVEYOR_MAX_MEDIA_BYTES": str(MAX_MEDIA_BYTES)})
    yield server
    server.stop()


def _chat(server: ConveyorServer, messages: list[dict[str, Any]]) -> Any:
    return server.openai_client().chat.completions.create(model=MODEL, messages=messages, max_tokens=NEW_TOKENS,
                                                          temperature=0, extra_body={"ignore_eos": True})


def test_image_chat_matches_transformers(llava_server: ConveyorServer, tiny_models: Path, media_dir: Path) -> None:
    cat = (media_dir / "cat.png").read_bytes()
    expected_text, expected_prompt_len = _hf_answer(str(tiny_models / "llava"), [cat])
    by_data = _chat(llava_server, _messages([_data_url(cat)]))
    assert by_data.choices[0].message.content == expected_text
    assert by_data.usage.prompt_tokens == expected_prompt_len  # the image's 16 tokens counted
    by_file = _chat(llava_server, _messages([f"file://{media_dir / 'cat.png'}"]))
    assert by_file.choices[0].message.content == expected_text

    other = _png(3, 120, 90)
    two_text, two_len = _hf_answer(str(tiny_models / "llava"), [other, cat], "Compare them.")
    both = _chat(llava_server, _messages([_data_url(other), _data_url(cat)], "Compare them."))
    assert (both.choices[0].message.content, both.usage.prompt_tokens) == (two_text, two_len)


def test_responses_input_image_matches_chat(llava_server: ConveyorServer, media_dir: Path) -> None:
    url = _data_url((media_dir / "cat.png").read_bytes())
    chat = _chat(llava_server, _messages([url])).choices[0].message.content
    response = llava_server.openai_client().responses.create(
        model=MODEL, max_output_tokens=NEW_TOKENS, temperature=0, extra_body={"ignore_eos": True},
        input=[{"role": "user", "content": [{"type": "input_image", "image_url": url, "detail": "auto"},
                                            {"type": "input_text", "text": QUESTION}]}])
    assert response.output_text == chat
    with pytest.raises(openai.BadRequestError) as refused:
        llava_server.openai_client().responses.create(model=MODEL, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "file:///etc/passwd"}]}])
    assert refused.value.body["param"] == "input"  # type: ignore[index]


def test_concurrent_image_and_text_requests_each_get_their_own_answer(llava_server: ConveyorServer,
                                                                       tiny_models: Path) -> None:
    pngs = [_png(10 + i, 50 + 10 * i, 70) for i in range(3)]
    expected = [_hf_answer(str(tiny_models / "llava"), [png])[0] for png in pngs]

    async def burst() -> list[Any]:
        client = llava_server.async_openai_client()
        calls = [client.chat.completions.create(model=MODEL, messages=_messages([_data_url(png)]),
                                                max_tokens=NEW_TOKENS, temperature=0,
                                                extra_body={"ignore_eos": True}) for png in pngs]
        calls.append(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                                    max_tokens=NEW_TOKENS, temperature=0))
        return list(await asyncio.gather(*calls))

    answers = asyncio.run(burst())
    assert [answer.choices[0].message.content for answer in answers[:3]] == expected
    assert answers[3].choices[0].message.content


def test_prefix_cache_reuses_an_image_only_for_the_same_image(llava_server: ConveyorServer) -> None:
    text = "Describe every detail of this picture, please, as precisely as you can manage."

    def cached(png: bytes) -> int:
        details = _chat(llava_server, _messages([_data_url(png)], text)).usage.prompt_tokens_details
        return details.cached_tokens if details else 0

    first, second = _png(20, 64, 64), _png(21, 64, 64)
    cached(first)
    again = cached(first)
    other = cached(second)
    assert again >= 16  # the blocks holding the image come from the cache
    assert other < again and other <= 16  # another image: at most the block before the image ("USER: ") hits


@pytest.mark.parametrize(("url", "reason"), [
    ("file:///etc/passwd", "outside"),
    ("escape.png", "outside"),  # a symlink inside the folder pointing out of it
    ("data:image/png;base64,not-base64!", "base64"),
    ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "image"),
    ("ftp://example.com/cat.png", "ftp"),
])
def test_refused_images_answer_400_naming_messages(llava_server: ConveyorServer, media_dir: Path, url: str,
                                                   reason: str) -> None:
    if url == "escape.png":
        url = f"file://{media_dir / url}"
    response = httpx.post(f"{llava_server.base_url}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": _messages([url]), "max_tokens": 2})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages" and reason in error["message"].lower(), error


def test_limits_and_placeholders(llava_server: ConveyorServer) -> None:
    png = _data_url(_png(5, 20, 20))
    too_many = httpx.post(f"{llava_server.base_url}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": _messages([png, png, png]), "max_tokens": 2})
    assert too_many.status_code == 400 and "at most 2" in too_many.json()["error"]["message"]
    typed = httpx.post(f"{llava_server.base_url}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": _messages([png], "look: <image>"), "max_tokens": 2})
    assert typed.status_code == 400 and "placeholder" in typed.json()["error"]["message"]
    tokenize = httpx.post(f"{llava_server.base_url}/tokenize", timeout=60, json={
        "model": MODEL, "messages": _messages([png])})
    assert tokenize.status_code == 400 and tokenize.json()["error"]["param"] == "messages"
    assert _chat(llava_server, [{"role": "user", "content": "still serving"}]).choices[0].message.content


def test_image_requests_survive_preemption_and_chunked_prefill(tiny_models: Path) -> None:
    """16 KV blocks for four ~6-block image chats: some are preempted and recomputed (their images re-encoded),
    and 8-token prefill chunks split every image; each answer equals the request's answer alone."""
    server = ConveyorServer(str(tiny_models / "llava"), "--num-gpu-blocks-override", "16", "--block-size", "16",
                            "--max-model-len", "256", "--no-enable-prefix-caching", "--max-num-batched-tokens", "8",
                            "--served-model-name", MODEL)
    try:
        pngs = [_png(30 + i, 64, 48) for i in range(4)]
        expected = [_hf_answer(str(tiny_models / "llava"), [png], QUESTION, new_tokens=60)[0] for png in pngs]

        async def together() -> list[Any]:
            client = server.async_openai_client()
            return list(await asyncio.gather(*[client.chat.completions.create(
                model=MODEL, messages=_messages([_data_url(png)]), max_tokens=60, temperature=0,
                extra_body={"ignore_eos": True}) for png in pngs]))

        assert [answer.choices[0].message.content for answer in asyncio.run(together())] == expected
        assert server.metric("conveyor:num_preemptions") > 0
    finally:
        assert server.stop() == []


def _saved_tensor_b64(tensor: torch.Tensor) -> str:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def test_precomputed_image_embeddings_answer_like_the_image(llava_server: ConveyorServer, tiny_models: Path) -> None:
    """--enable-mm-embeds: the image's embeddings from transformers (float32, and bfloat16-rounded), sent as vLLM's
    image_embeds part (base64 of torch.save), answer as the image itself does; a malformed tensor is a 400."""
    from PIL import Image

    model, processor = _reference(str(tiny_models / "llava"))
    png = _png(21, 70, 50)
    pixels = processor(images=[Image.open(io.BytesIO(png)).convert("RGB")], text=["<image>"],
                       return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels).pooler_output[0]  # [16, hidden]
    by_image = _chat(llava_server, _messages([_data_url(png)])).choices[0].message.content
    for tensor in (features, features[None]):
        part = {"type": "image_embeds", "image_embeds": _saved_tensor_b64(tensor)}
        answer = _chat(llava_server, [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}])
        assert answer.choices[0].message.content == by_image
    for bad in (_saved_tensor_b64(features[:, :5]), base64.b64encode(b"not a tensor").decode(), "%%%"):
        with pytest.raises(openai.BadRequestError) as refused:
            _chat(llava_server, [{"role": "user", "content": [{"type": "image_embeds", "image_embeds": bad},
                                                              {"type": "text", "text": QUESTION}]}])
        assert refused.value.body["param"] == "messages"  # type: ignore[index]


def test_images_over_http_follow_the_allowed_hosts(llava_server: ConveyorServer, base_url: str) -> None:
    """The test's HTTP server on 127.0.0.1 (the only --allowed-media-domains host): its image answers as the same
    bytes inline do; a 404, a slow answer (VLLM_IMAGE_FETCH_TIMEOUT 0.5 s), a redirect to another host and another
    host itself are 400s naming messages, and the server goes on."""
    assert _chat(llava_server, _messages([f"{base_url}/image.png"])).choices[0].message.content == \
        _chat(llava_server, _messages([_data_url(PNG)])).choices[0].message.content
    other_host = base_url.replace("127.0.0.1", "localhost")
    for url in (f"{base_url}/missing.png", f"{base_url}/slow", f"{base_url}/redirect-out", f"{other_host}/image.png"):
        with pytest.raises(openai.BadRequestError) as refused:
            _chat(llava_server, _messages([url]))
        assert refused.value.body["param"] == "messages", url  # type: ignore[index]
    assert _chat(llava_server, [{"role": "user", "content": "still serving"}]).choices[0].message.content


def test_an_image_over_the_byte_limit_is_refused(llava_server: ConveyorServer, media_dir: Path) -> None:
    big = _png(22, 400, 400)  # random pixels do not compress: ~480 kB
    assert len(big) > MAX_MEDIA_BYTES
    (media_dir / "big.png").write_bytes(big)
    for url in (_data_url(big), f"file://{media_dir / 'big.png'}"):
        with pytest.raises(openai.BadRequestError) as refused:
            _chat(llava_server, _messages([url]))
        assert refused.value.body["param"] == "messages" and "bytes" in str(refused.value)  # type: ignore[index]
