"""Tiny deterministic vision-language checkpoints for tests: `python scripts/tiny_multimodal_models.py --out DIR`
(scripts/make_tiny_models.py writes them too, beside the text models).

`llava`: LlavaForConditionalGeneration with a 2-layer CLIP vision tower (56 x 56 images, 14-pixel patches: 16
image tokens per image), the 2-layer projector and the tiny Llama as the language model, SmolLM2's real tokenizer
with an added `<image>` token, a CLIP preprocessor config and llava-hf's chat template (images placed where the
message's image parts stand).

`qwen2_vl`: Qwen2VLForConditionalGeneration with a 2-layer vision tower (14-pixel patches, 2x2 patch merging, images
resized to between 56x56 and 112x112 pixels: 4 to 16 image tokens), a tiny Qwen2 language model with M-RoPE
(sections [2, 3, 3]), SmolLM2's tokenizer with Qwen2-VL's vision tokens added, Qwen2-VL's preprocessor configs
and Qwen2-VL-Instruct's chat template.
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


QWEN2_VL_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN2_VL_MIN_PIXELS = 56 * 56
QWEN2_VL_MAX_PIXELS = 112 * 112
QWEN2_VL_VIDEO_MAX_PIXELS = 84 * 84  # keeps a few frames' tokens small

# Qwen/Qwen2-VL-2B-Instruct's template.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")


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


def qwen2_vl_preprocessor_config(max_pixels: int, video: bool = False) -> dict[str, Any]:
    """What Qwen2-VL folders carry (preprocessor_config.json; video_preprocessor_config.json when `video`)."""
    kind = "Video" if video else "Image"
    return {f"{kind.lower()}_processor_type": f"Qwen2VL{kind}Processor", "processor_class": "Qwen2VLProcessor",
            "min_pixels": QWEN2_VL_MIN_PIXELS, "max_pixels": max_pixels, "patch_size": 14,
            "temporal_patch_size": 2, "merge_size": 2, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_resize": True,
            "resample": 3, "do_convert_rgb": True}


def qwen2_vl_config(text_config: Any, token_ids: dict[str, int]) -> Any:
    from transformers import Qwen2VLConfig

    text = {key: getattr(text_config, key) for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "initializer_range")}
    text.update(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    vision = {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2, "hidden_size": text["hidden_size"],
              "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3,
              "hidden_act": "quick_gelu", "initializer_range": 0.3}
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=token_ids["<|image_pad|>"],
                         video_token_id=token_ids["<|video_pad|>"],
                         vision_start_token_id=token_ids["<|vision_start|>"],
                         vision_end_token_id=token_ids["<|vision_end|>"], tie_word_embeddings=False)


def write_qwen2_vl_model(out_dir: Path, tokenizer: Any, text_config: Any) -> None:
    import copy

    import torch
    from transformers import Qwen2VLForConditionalGeneration

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN2_VL_VISION_TOKENS})
    token_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_VL_VISION_TOKENS}
    text_config = copy.deepcopy(text_config)
    text_config.vocab_size = len(tokenizer)
    torch.manual_seed(2468)
    model = Qwen2VLForConditionalGeneration(qwen2_vl_config(text_config, token_ids)).eval()
    folder = out_dir / "qwen2_vl"
    model.save_pretrained(folder)
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(QWEN2_VL_CHAT_TEMPLATE)
    (folder / "preprocessor_config.json").write_text(json.dumps(qwen2_vl_preprocessor_config(QWEN2_VL_MAX_PIXELS),
                                                                indent=2))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(
        qwen2_vl_preprocessor_config(QWEN2_VL_VIDEO_MAX_PIXELS, video=True), indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))
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
    write_qwen2_vl_model(args.out, tokenizer, tiny_configs()["qwen2"])


if __name__ == "__main__":
    main()
