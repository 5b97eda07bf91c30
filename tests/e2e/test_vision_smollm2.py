"""A LLaVA whose language model is the real SmolLM2-135M-Instruct (scripts/smollm2_llava_model.py: random vision
tower, built into .models/ on first use), served for real: "What is the capital of France?" is answered with Paris
with no image, one image, or two images of different sizes. Each answer equals transformers'
LlavaForConditionalGeneration token for token (16 tokens, past the end of turn) with logprobs within 1e-3, and the
text-only answer equals SmolLM2's own from the GGUF, so the image path leaves the text path untouched."""
from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.e2e.test_vision_chat import _data_url, _messages, _png, _reference
from tests.reference import load_reference
from tests.server_harness import REPO_ROOT, ConveyorServer

MODEL = "smollm2-llava"
FOLDER_NAME = "smollm2_llava"  # what scripts/smollm2_llava_model.py writes under --out
QUESTION = "What is the capital of France?"
NEW_TOKENS = 16
LOGPROB_TOLERANCE = 1e-3
IMAGE_SETS = {"text only": [], "one image": [_png(7, 80, 60)], "two sizes": [_png(8, 120, 90), _png(9, 40, 70)]}


@pytest.fixture(scope="module")
def model_dir(tiny_models: Path) -> Path:
    """Built once per checkout (about a minute: it loads the GGUF); the script writes the folder atomically."""
    folder = tiny_models / FOLDER_NAME
    if not (folder / "model.safetensors").exists():
        subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "smollm2_llava_model.py"),
                        "--out", str(tiny_models)], check=True, cwd=REPO_ROOT)
    return folder


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ConveyorServer]:
    server = ConveyorServer(str(model_dir), "--served-model-name", MODEL, "--max-model-len", "512",
                            "--kv-cache-memory", "64MiB")
    yield server
    assert server.stop() == []


def _ask(server: ConveyorServer, pngs: list[bytes], ignore_eos: bool) -> tuple[Any, list[int], list[float]]:
    """(response, generated token ids, chosen-token logprobs) of a greedy chat; ignore_eos runs NEW_TOKENS."""
    messages = _messages([_data_url(png) for png in pngs], QUESTION) if pngs else [
        {"role": "user", "content": QUESTION}]
    client: Any = server.openai_client()  # type: ignore[no-untyped-call]
    response = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=NEW_TOKENS, temperature=0, logprobs=True,
        extra_body={"ignore_eos": ignore_eos, "return_token_ids": True})
    choice = response.choices[0]
    return response, (choice.model_extra or {})["token_ids"], [entry.logprob for entry in choice.logprobs.content]


def _greedy(model: Any, inputs: dict[str, Any]) -> tuple[list[int], list[float]]:
    """transformers' greedy NEW_TOKENS (eos does not stop it, as ignore_eos) and their logprobs."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             output_logits=True, return_dict_in_generate=True)
    new_ids = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return new_ids, [torch.log_softmax(logits[0].float(), dim=-1)[token].item()
                     for logits, token in zip(out.logits, new_ids)]


def _llava_reference(model_dir: Path, pngs: list[bytes]) -> tuple[list[int], list[int], list[float]]:
    """(prompt ids, greedy ids, logprobs) from transformers' LlavaForConditionalGeneration on the same images."""
    from PIL import Image

    torch.set_num_threads(1)
    model, processor = _reference(str(model_dir))
    content = [{"type": "image"}] * len(pngs) + [{"type": "text", "text": QUESTION}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs] or None
    inputs = dict(processor(images=images, text=[prompt], return_tensors="pt"))
    return inputs["input_ids"][0].tolist(), *_greedy(model, inputs)


def _smollm2_reference() -> tuple[list[int], list[int], list[float]]:
    """(prompt ids, greedy ids, logprobs) of plain SmolLM2 from its GGUF, with the GGUF's own chat template."""
    from conveyor.model_source import default_model_path

    # The key tests/e2e/test_parity.py loads it under: in a whole-suite run the (slow) GGUF load may be cached.
    model, tokenizer = load_reference(default_model_path())
    inputs = dict(tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True))
    return inputs["input_ids"][0].tolist(), *_greedy(model, inputs)


def _assert_same(got: tuple[list[int], list[float]], expected: tuple[list[int], list[float]]) -> None:
    assert got[0] == expected[0]
    assert max(abs(a - b) for a, b in zip(got[1], expected[1])) < LOGPROB_TOLERANCE, (got[1], expected[1])


@pytest.mark.parametrize("name", IMAGE_SETS)
def test_answers_paris_as_transformers_llava_does(server: ConveyorServer, model_dir: Path, name: str) -> None:
    pngs = IMAGE_SETS[name]
    answer, answer_ids, _ = _ask(server, pngs, ignore_eos=False)
    assert "Paris" in answer.choices[0].message.content and answer.choices[0].finish_reason == "stop"
    long, long_ids, long_logprobs = _ask(server, pngs, ignore_eos=True)
    prompt_ids, expected_ids, expected_logprobs = _llava_reference(model_dir, pngs)
    assert long.model_extra["prompt_token_ids"] == prompt_ids  # 16 placeholders per image, where it stood
    assert long.usage.prompt_tokens == len(prompt_ids) and len(long_ids) == NEW_TOKENS
    _assert_same((long_ids, long_logprobs), (expected_ids, expected_logprobs))
    assert expected_ids[:len(answer_ids)] == answer_ids  # the natural answer stops at SmolLM2's end of turn


def test_text_only_answer_is_smollm2s_own(server: ConveyorServer) -> None:
    response, ids, logprobs = _ask(server, [], ignore_eos=True)
    prompt_ids, expected_ids, expected_logprobs = _smollm2_reference()
    assert response.model_extra["prompt_token_ids"] == prompt_ids  # the extended template renders text as before
    _assert_same((ids, logprobs), (expected_ids, expected_logprobs))


def test_images_change_the_logits_but_not_the_answer(server: ConveyorServer) -> None:
    """The vision tower is not idle: each image set gives other logprobs, and the same words."""
    answers = {name: _ask(server, pngs, ignore_eos=False) for name, pngs in IMAGE_SETS.items()}
    assert len({response.choices[0].message.content for response, _, _ in answers.values()}) == 1
    first_logprobs = {round(logprobs[0], 3) for _, _, logprobs in answers.values()}
    assert len(first_logprobs) == len(IMAGE_SETS), first_logprobs
