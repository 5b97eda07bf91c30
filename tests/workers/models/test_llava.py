"""LLaVA in the model runner against transformers' LlavaForConditionalGeneration on the tiny checkpoint: greedy
tokens equal, chosen-token logprobs within 1e-3, with images merged at their placeholders; chunked prefill across
an image, batches mixing images and text, and a request whose image is broken failing alone."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine_core.protocol import MultiModalItem
from tests.workers.harness import RunnerDriver, make_runner

LOGPROB_TOLERANCE = 1e-3
NEW_TOKENS = 8


@lru_cache(maxsize=1)
def _reference(model_dir: str) -> tuple[Any, Any]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return (LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval(),
            AutoProcessor.from_pretrained(model_dir))


def _image(seed: int, width: int, height: int) -> Any:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _prompt(model_dir: str, text: str, num_images: int) -> str:
    _, processor = _reference(model_dir)
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    return str(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))


def _processed(model_dir: str, text: str, images: list[Any]) -> tuple[list[int], list[MultiModalItem], Any]:
    """Prompt token ids (placeholders expanded), our wire items, and the processor's tensors for transformers."""
    model, processor = _reference(model_dir)
    inputs = processor(images=images or None, text=[_prompt(model_dir, text, len(images))], return_tensors="pt")
    token_ids = inputs["input_ids"][0].tolist()
    image_token_id = model.config.image_token_index
    items, position = [], 0
    for index in range(len(images)):
        offset = token_ids.index(image_token_id, position)
        length = 0
        while offset + length < len(token_ids) and token_ids[offset + length] == image_token_id:
            length += 1
        pixels = inputs["pixel_values"][index].numpy().astype("<f4")
        items.append(MultiModalItem("image", pixels.tobytes(), list(pixels.shape), "float32", offset, length,
                                    f"image-{index}-{text}"))
        position = offset + length
    return token_ids, items, inputs


def _hf_greedy(model_dir: str, inputs: Any) -> tuple[list[int], list[float]]:
    model, _ = _reference(model_dir)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    new_ids = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[token].item() for step, token in zip(out.logits, new_ids)]
    return new_ids, logprobs


def _assert_matches(driver: RunnerDriver, request_id: str, expected: tuple[list[int], list[float]]) -> None:
    got = driver.requests[request_id]
    assert got.output_token_ids == expected[0], request_id
    assert np.allclose(got.output_logprobs, expected[1], atol=LOGPROB_TOLERANCE), request_id


@pytest.fixture(scope="module")
def llava(tiny_models: Path) -> str:
    return str(tiny_models / "llava")


def test_image_prompts_match_transformers_alone_batched_and_chunked(llava: str) -> None:
    cases = {"one": ("What is in this picture?", [_image(1, 80, 60)]),
             "two": ("Compare them.", [_image(2, 40, 90), _image(3, 200, 120)]),
             "text": ("Just text, no image.", [])}
    processed = {name: _processed(llava, text, images) for name, (text, images) in cases.items()}
    expected = {name: _hf_greedy(llava, inputs) for name, (_, _, inputs) in processed.items()}
    assert expected["one"][0] != expected["text"][0]
    for chunk in (None, 5):  # one prefill step; then 5-token chunks that split every image
        _, driver = make_runner(llava, num_blocks=64)
        for name, (token_ids, items, _) in processed.items():
            driver.add(name, token_ids, mm_items=items)
        driver.generate(list(processed), NEW_TOKENS, chunk=chunk)
        for name in processed:
            _assert_matches(driver, name, expected[name])


def test_a_broken_image_fails_its_request_alone(llava: str) -> None:
    token_ids, items, inputs = _processed(llava, "What is in this picture?", [_image(4, 64, 64)])
    broken = [MultiModalItem("image", items[0].pixel_values[:-4], items[0].shape, "float32", items[0].offset,
                             items[0].length, "broken")]
    _, driver = make_runner(llava, num_blocks=64)
    driver.add("good", token_ids, mm_items=items)
    driver.add("broken", token_ids, mm_items=broken)
    output = driver.step({"good": len(token_ids), "broken": len(token_ids)})
    assert output.sampled_token_ids[1] == [] and "carries" in (output.request_errors or {})["broken"]
    driver.finish(["broken"])
    driver.generate(["good"], NEW_TOKENS)
    _assert_matches(driver, "good", _hf_greedy(llava, inputs))
