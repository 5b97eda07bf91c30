"""Hugging Face transformers as the reference: greedy tokens and chosen-token logprobs for a prompt."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=4)
def load_reference(model_path: str):  # -> (model, tokenizer)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    path = Path(model_path)
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = str(path.parent) if path.suffix == ".gguf" else model_path
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    return model, tokenizer


def greedy_reference(model_path: str, prompt: str, max_new_tokens: int) -> tuple[list[int], list[float], str]:
    """(token ids, chosen-token logprobs from the raw logits, decoded text) of greedy decoding."""
    return greedy_of(*load_reference(model_path), prompt, max_new_tokens)


def greedy_of(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[list[int], list[float], str]:  # noqa: ANN001
    """`greedy_reference` for a model already loaded (and perhaps changed: quantized weights)."""
    import torch

    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                             top_p=None, top_k=None, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=tokenizer.eos_token_id)
    new_ids = out.sequences[0, input_ids.shape[1]:].tolist()
    logprobs = [torch.log_softmax(step_logits[0].float(), dim=-1)[token].item()
                for step_logits, token in zip(out.logits, new_ids)]
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    text_ids = new_ids[:-1] if new_ids and new_ids[-1] in eos_ids else new_ids
    return new_ids, logprobs, tokenizer.decode(text_ids, skip_special_tokens=True)
