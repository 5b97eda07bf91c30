"""Qwen2-VL in the model runner against transformers' Qwen2VLForConditionalGeneration on the tiny checkpoint:
greedy tokens equal and chosen-token logprobs within 1e-3, with images of different sizes (different grids and
token counts), M-RoPE positions, chunked prefill across an image, and batches mixing images and text.

Pixel values come from transformers' PIL image processor (the frontend's numpy one is checked against it in
tests/frontend/multimodal); the prompt is the tokenizer's chat template with each <|image_pad|> expanded to the
image's token count, as Qwen2VLProcessor does."""
from __future__ import annotations

import json
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
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    return (Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(model_dir))


def _image_processor(model_dir: str, max_pixels: int | None = None) -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    settings = json.loads(Path(model_dir, "preprocessor_config.json").read_text())
    return Qwen2VLImageProcessorPil(min_pixels=settings["min_pixels"], max_pixels=max_pixels or settings["max_pixels"])


def image(seed: int, width: int, height: int) -> Any:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _processed(model_dir: str, text: str, images: list[Any]) -> tuple[list[int], list[MultiModalItem], dict]:
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]
    return qwen2_vl_inputs(model_dir, [{"role": "user", "content": content}], images)


def qwen2_vl_inputs(model_dir: str, messages: list[dict[str, Any]], images: list[Any],
                    max_pixels: int | None = None) -> tuple[list[int], list[MultiModalItem], dict]:
    """Prompt token ids (pads expanded), our wire items, and the tensors transformers' generate() takes, for
    messages whose `{"type": "image"}` parts stand for `images` in order."""
    model, tokenizer = _reference(model_dir)
    processor = _image_processor(model_dir, max_pixels)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pad = model.config.image_token_id
    token_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    hf_inputs: dict[str, Any] = {}
    grids: list[list[int]] = []
    pixel_rows: list[np.ndarray] = []
    if images:
        features = processor(images=images, return_tensors="pt")
        hf_inputs = {"pixel_values": features["pixel_values"], "image_grid_thw": features["image_grid_thw"]}
        grids = features["image_grid_thw"].tolist()
        pixel_rows = np.split(features["pixel_values"].numpy().astype("<f4"),
                              np.cumsum([t * h * w for t, h, w in grids])[:-1])
    expanded: list[int] = []
    items: list[MultiModalItem] = []
    for token_id in token_ids:
        if token_id != pad:
            expanded.append(token_id)
            continue
        index = len(items)
        length = int(np.prod(grids[index])) // 4
        rows = np.ascontiguousarray(pixel_rows[index])
        items.append(MultiModalItem("image", rows.tobytes(), list(rows.shape), "float32", len(expanded), length,
                                    f"image-{index}-{prompt}", grid_thw=grids[index]))
        expanded.extend([pad] * length)
    input_ids = torch.tensor([expanded])
    hf_inputs.update(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                     mm_token_type_ids=(input_ids == pad).int())
    return expanded, items, hf_inputs


def hf_greedy(model_dir: str, inputs: dict, new_tokens: int = NEW_TOKENS) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens and their logprobs."""
    model, _ = _reference(model_dir)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    new_ids = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[token].item() for step, token in zip(out.logits, new_ids)]
    return new_ids, logprobs


def _assert_matches(driver: RunnerDriver, request_id: str, expected: tuple[list[int], list[float]]) -> None:
    got = driver.requests[request_id]
    assert got.output_token_ids == expected[0], request_id
    assert np.allclose(got.output_logprobs, expected[1], atol=LOGPROB_TOLERANCE), request_id


@pytest.fixture(scope="module")
def qwen2_vl(tiny_models: Path) -> str:
    return str(tiny_models / "qwen2_vl")


def test_image_prompts_match_transformers_alone_batched_and_chunked(qwen2_vl: str) -> None:
    cases = {"one": ("What is in this picture?", [image(1, 80, 60)]),
             "two": ("Compare them.", [image(2, 40, 90), image(3, 200, 120)]),
             "tall": ("And this?", [image(5, 60, 170)]),
             "text": ("Just text, no image.", [])}
    processed = {name: _processed(qwen2_vl, text, images) for name, (text, images) in cases.items()}
    assert len({len(items[0].pixel_values) for _, items, _ in processed.values() if items}) > 1  # several grids
    expected = {name: hf_greedy(qwen2_vl, inputs) for name, (_, _, inputs) in processed.items()}
    assert expected["one"][0] != expected["text"][0]
    for chunk in (None, 5):  # one prefill step; then 5-token chunks that split every image
        _, driver = make_runner(qwen2_vl, num_blocks=64)
        for name, (token_ids, items, _) in processed.items():
            driver.add(name, token_ids, mm_items=items)
        driver.generate(list(processed), NEW_TOKENS, chunk=chunk)
        for name in processed:
            _assert_matches(driver, name, expected[name])


def test_m_rope_positions_equal_transformers_rope_index(qwen2_vl: str) -> None:
    """The worker's three-row positions and shift are transformers' get_rope_index and rope delta."""
    from workers.models.qwen2_vl import Qwen2VLForConditionalGeneration

    model, _ = _reference(qwen2_vl)
    _, items, inputs = _processed(qwen2_vl, "Compare them.", [image(2, 40, 90), image(3, 200, 120)])
    expected, delta = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                 image_grid_thw=inputs["image_grid_thw"])
    ours = Qwen2VLForConditionalGeneration.__new__(Qwen2VLForConditionalGeneration)
    ours.merge_size = 2
    prefix, shift = ours.rope_positions(items)
    num_tokens = inputs["input_ids"].shape[1]
    full = torch.cat([prefix, (torch.arange(prefix.shape[1], num_tokens) + shift).expand(3, -1)], dim=1)
    assert torch.equal(full, expected[:, 0]) and shift == int(delta)
