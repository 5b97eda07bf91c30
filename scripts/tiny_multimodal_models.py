"""Tiny deterministic vision-language checkpoints for tests: `python scripts/tiny_multimodal_models.py --out DIR`
(scripts/make_tiny_models.py writes them too, beside the text models).

`llava`: LlavaForConditionalGeneration with a 2-layer CLIP vision tower (56 x 56 images, 14-pixel patches: 16
image tokens per image), the 2-layer projector and the tiny Llama as the language model, SmolLM2's real tokenizer
with an added `<image>` token, a CLIP preprocessor config and llava-hf's chat template (images placed where the
message's image parts stand).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"
LLAVA_IMAGE_SIZE = 56
LLAVA_PATCH_SIZE = 14
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# llava-hf/llava-1.5-7b-hf's template: the message's parts in order, an image part becoming `<image>\n`.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def clip_preprocessor_config(size: int) -> dict[str, Any]:
    """What llava-hf folders carry (openai/clip-vit-large-patch14-336's processor), at `size` pixels."""
    return {"image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
            "do_resize": True, "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": size, "width": size}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_convert_rgb": True}


def llava_config(text_config: Any, image_token_id: int) -> Any:
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=LLAVA_IMAGE_SIZE, patch_size=LLAVA_PATCH_SIZE, projection_dim=32,
                              initializer_range=0.3)
    num_patches = (LLAVA_IMAGE_SIZE // LLAVA_PATCH_SIZE) ** 2
    return LlavaConfig(vision_config=vision, text_config=text_config, image_token_index=image_token_id,
                       image_seq_length=num_patches, vision_feature_select_strategy="default",
                       vision_feature_layer=-2, projector_hidden_act="gelu", tie_word_embeddings=False)


def write_llava_model(out_dir: Path, tokenizer: Any, text_config: Any) -> None:
    import copy

    import torch
    from transformers import LlavaForConditionalGeneration

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config = copy.deepcopy(text_config)
    text_config.vocab_size = len(tokenizer)
    text_config.tie_word_embeddings = False
    torch.manual_seed(4321)
    model = LlavaForConditionalGeneration(llava_config(text_config, image_token_id)).eval()
    folder = out_dir / "llava"
    model.save_pretrained(folder)
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(LLAVA_CHAT_TEMPLATE)
    (folder / "preprocessor_config.json").write_text(json.dumps(clip_preprocessor_config(LLAVA_IMAGE_SIZE),
                                                                indent=2))
    processor = {"processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN, "patch_size": LLAVA_PATCH_SIZE,
                 "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2))
    generation = {"bos_token_id": 1, "eos_token_id": 2}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    print(f"wrote {folder}", flush=True)


def main() -> None:
    import argparse
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from make_tiny_models import smollm2_gguf_path, tiny_configs  # the text side and tokenizer they share

    gguf_path = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    args.out.mkdir(parents=True, exist_ok=True)
    write_llava_model(args.out, tokenizer, tiny_configs()["llama"])


if __name__ == "__main__":
    main()
