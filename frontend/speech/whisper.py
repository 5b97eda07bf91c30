"""Whisper's decoder prompt, built from the tokenizer's special tokens as transformers' `generate()` builds it:

```
 [<|startofprev|> " " + prompt tokens]  <|startoftranscript|>  [<|lang|> <|transcribe|>|<|translate|>]  <|notimestamps|>
  optional: the request's `prompt`                               multilingual models only
```
Segment timestamps (srt, vtt, verbose_json) drop `<|notimestamps|>`, as transformers' `return_timestamps=True`: the
worker then applies Whisper's timestamp rules, and the output reads `<|t0|> text <|t1|><|t1|> text <|t2|>`, where
timestamp token `<|0.00|>` + k (the id after `<|notimestamps|>`, plus k) is k * 0.02 s into the window.
English-only checkpoints (tiny.en, base.en, ...) take no language or task token. Which kind a checkpoint is comes
from generation_config.json `is_multilingual`, else the vocabulary size (51864 for .en models, 51865+ otherwise)
in config.json, vocabulary.txt (CTranslate2) or the tokenizer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frontend.errors import BadRequestError
from frontend.tokenizer import TokenizerInfo

WHISPER_ARCHITECTURE = "WhisperForConditionalGeneration"
MULTILINGUAL_VOCAB_SIZE = 51865  # English-only Whisper vocabularies have 51864 tokens

# Whisper's language codes and names (openai/whisper tokenizer.py), in token order.
_LANGUAGE_TABLE = (
    "en english|zh chinese|de german|es spanish|ru russian|ko korean|fr french|ja japanese|pt portuguese|"
    "tr turkish|pl polish|ca catalan|nl dutch|ar arabic|sv swedish|it italian|id indonesian|hi hindi|fi finnish|"
    "vi vietnamese|he hebrew|uk ukrainian|el greek|ms malay|cs czech|ro romanian|da danish|hu hungarian|ta tamil|"
    "no norwegian|th thai|ur urdu|hr croatian|bg bulgarian|lt lithuanian|la latin|mi maori|ml malayalam|cy welsh|"
    "sk slovak|te telugu|fa persian|lv latvian|bn bengali|sr serbian|az azerbaijani|sl slovenian|kn kannada|"
    "et estonian|mk macedonian|br breton|eu basque|is icelandic|hy armenian|ne nepali|mn mongolian|bs bosnian|"
    "kk kazakh|sq albanian|sw swahili|gl galician|mr marathi|pa punjabi|si sinhala|km khmer|sn shona|yo yoruba|"
    "so somali|af afrikaans|oc occitan|ka georgian|be belarusian|tg tajik|sd sindhi|gu gujarati|am amharic|"
    "yi yiddish|lo lao|uz uzbek|fo faroese|ht haitian creole|ps pashto|tk turkmen|nn nynorsk|mt maltese|"
    "sa sanskrit|lb luxembourgish|my myanmar|bo tibetan|tl tagalog|mg malagasy|as assamese|tt tatar|haw hawaiian|"
    "ln lingala|ha hausa|ba bashkir|jw javanese|su sundanese|yue cantonese")
LANGUAGE_NAMES: dict[str, str] = dict(item.split(" ", 1) for item in _LANGUAGE_TABLE.split("|"))
_CODE_BY_NAME = {name: code for code, name in LANGUAGE_NAMES.items()}


def is_whisper(architecture: str) -> bool:
    return architecture == WHISPER_ARCHITECTURE


@dataclass(frozen=True)
class WhisperVocab:
    """The special token ids a speech request needs, and whether the checkpoint is multilingual."""

    start_of_transcript: int
    end_of_text: int
    no_timestamps: int
    transcribe: int | None
    translate: int | None
    start_of_prev: int | None
    language_ids: dict[str, int]  # language code -> its <|code|> token id
    multilingual: bool

    @classmethod
    def load(cls, tokenizer: TokenizerInfo, folders: list[Path]) -> WhisperVocab:
        def token(text: str) -> int | None:
            token_id = tokenizer.tokenizer.token_to_id(text)
            return None if token_id is None else int(token_id)

        required = {name: token(name) for name in ("<|startoftranscript|>", "<|endoftext|>", "<|notimestamps|>")}
        missing = [name for name, token_id in required.items() if token_id is None]
        if missing:
            raise ValueError(f"the tokenizer lacks Whisper's special token(s) {', '.join(missing)}")
        languages = {code: token_id for code in LANGUAGE_NAMES if (token_id := token(f"<|{code}|>")) is not None}
        return cls(start_of_transcript=required["<|startoftranscript|>"] or 0,
                   end_of_text=required["<|endoftext|>"] or 0, no_timestamps=required["<|notimestamps|>"] or 0,
                   transcribe=token("<|transcribe|>"), translate=token("<|translate|>"),
                   start_of_prev=token("<|startofprev|>"), language_ids=languages,
                   multilingual=_is_multilingual(tokenizer, folders) and bool(languages))

    @property
    def languages(self) -> list[str]:
        return list(self.language_ids) if self.multilingual else ["en"]

    def language_code(self, language: str | None, param: str = "language") -> str | None:
        """The ISO-639-1 code of a request's `language` (a code, an English name or `<|code|>`); None when not
        given (a multilingual model then detects it). 400 for a language the model does not know."""
        if language is None or not language.strip():
            return None if self.multilingual else "en"
        text = language.strip().lower().removeprefix("<|").removesuffix("|>")
        code = _CODE_BY_NAME.get(text, text)
        if not self.multilingual:
            if code != "en":
                raise BadRequestError(f"this model is English-only and cannot transcribe language {language!r}: "
                                      "send English audio (language 'en') or serve a multilingual Whisper model",
                                      param=param)
            return code
        if code not in self.language_ids:
            raise BadRequestError(f"unsupported language {language!r}: give an ISO-639-1 code this model knows, one "
                                  f"of {', '.join(self.language_ids)}", param=param)
        return code

    @property
    def timestamp_begin(self) -> int:
        """The id of `<|0.00|>`: every id from here on is a timestamp, 0.02 s apart."""
        return self.no_timestamps + 1

    def decoder_prompt(self, task: str, language: str | None, prompt_ids: list[int],
                       timestamps: bool = False) -> list[int]:
        """The decoder prompt for `task` ("transcribe" | "translate") in `language` (a code; ignored by
        English-only models), after the optional `<|startofprev|>` prompt; without `<|notimestamps|>` when the
        output should carry segment timestamps."""
        prefix = [self.start_of_transcript]
        if self.multilingual:
            task_id = self.translate if task == "translate" else self.transcribe
            assert task_id is not None and language is not None
            prefix += [self.language_ids[language], task_id]
        return prompt_ids + prefix + ([] if timestamps else [self.no_timestamps])

    def language_detection_prompt(self) -> list[int]:
        return [self.start_of_transcript]

    def language_of_token(self, token_id: int) -> str | None:
        return next((code for code, language_id in self.language_ids.items() if language_id == token_id), None)

    def previous_text_ids(self, tokenizer: TokenizerInfo, text: str | None, max_tokens: int) -> list[int]:
        """`<|startofprev|>` + the tokens of " " + text (its last `max_tokens`), as transformers' prompt_ids;
        [] without a prompt. 400 for text that encodes to special tokens."""
        if not text or not text.strip():
            return []
        if self.start_of_prev is None:
            raise BadRequestError("this model's tokenizer has no <|startofprev|> token, so it takes no prompt",
                                  param="prompt")
        ids = tokenizer.encode(" " + text.strip(), add_special_tokens=False)
        special = next((token_id for token_id in ids if token_id >= self.end_of_text), None)
        if special is not None:
            raise BadRequestError(f"the prompt contains the special token {tokenizer.token_text(special)!r}",
                                  param="prompt")
        return [self.start_of_prev] + ids[-max_tokens:]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_multilingual(tokenizer: TokenizerInfo, folders: list[Path]) -> bool:
    for folder in folders:
        flag = _read_json(folder / "generation_config.json").get("is_multilingual")
        if isinstance(flag, bool):
            return flag
    for folder in folders:
        vocab_size = _read_json(folder / "config.json").get("vocab_size")
        if isinstance(vocab_size, int) and not isinstance(vocab_size, bool):
            return vocab_size >= MULTILINGUAL_VOCAB_SIZE
    for folder in folders:
        vocabulary = folder / "vocabulary.txt"  # CTranslate2: one token per line
        if vocabulary.is_file():
            with vocabulary.open("rb") as handle:
                return sum(1 for _ in handle) >= MULTILINGUAL_VOCAB_SIZE
    return tokenizer.vocab_size >= MULTILINGUAL_VOCAB_SIZE
