"""use_beam_search: the frontend's beam search equals Hugging Face transformers' on the tiny Llama."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.reference import load_reference
from tests.server_harness import ConveyorServer

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,"]
WIDTH = 4
MAX_TOKENS = 6


def _hf_beams(model_path: str, prompt: str, length_penalty: float) -> list[str]:
    import torch

    model, tokenizer = load_reference(model_path)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids, num_beams=WIDTH, num_return_sequences=WIDTH, do_sample=False,
                             max_new_tokens=MAX_TOKENS, length_penalty=length_penalty, early_stopping=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.eos_token_id)
    return [tokenizer.decode(sequence[input_ids.shape[1]:], skip_special_tokens=True) for sequence in out]


@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_beam_search_matches_transformers(llama_server: ConveyorServer, tiny_models: Path,
                                          length_penalty: float) -> None:
    for prompt in PROMPTS:
        body = httpx.post(f"{llama_server.base_url}/v1/completions", timeout=120, json={
            "model": "tiny-llama", "prompt": prompt, "max_tokens": MAX_TOKENS, "n": WIDTH, "use_beam_search": True,
            "length_penalty": length_penalty}).json()
        texts = [choice["text"] for choice in sorted(body["choices"], key=lambda c: c["index"])]
        assert texts == _hf_beams(str(tiny_models / "llama"), prompt, length_penalty), prompt
        assert body["usage"]["completion_tokens"] == WIDTH * MAX_TOKENS


def test_beam_search_in_chat_and_its_limits(llama_server: ConveyorServer) -> None:
    client = llama_server.openai_client()
    chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=4, n=2, extra_body={"use_beam_search": True})
    assert len(chat.choices) == 2 and all(choice.message.content for choice in chat.choices)
    refused = httpx.post(f"{llama_server.base_url}/v1/completions", timeout=60, json={
        "model": "tiny-llama", "prompt": "Hi", "max_tokens": 3, "use_beam_search": True, "stream": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream"
