"""What a `StructuredOutputSpec` means: its llguidance grammar. Torch-free: the frontend compiles each spec here to
reject bad ones with a 400 before anything reaches the engine, and rank 0's worker builds its matchers from the
same grammar (workers/sampling/structured_output.py).

llguidance (Rust, no torch) turns JSON schemas, regexes, Lark/GBNF grammars and structural tags into one grammar
format and computes token masks in tens of microseconds on a 49k vocabulary.
"""
from __future__ import annotations

import functools
import json
from typing import Any

from llguidance import LLMatcher, StructTag, regex_to_lark
from llguidance.gbnf_to_lark import any_to_lark

from engine_core.protocol import StructuredOutputSpec

KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")

# JSON whitespace between tokens: any run of up to 40 blanks/newlines/tabs (room for pretty-printed, indented
# output) but never an endless run of it, which weak or unlucky sampling otherwise produces. A schema's own
# "x-guidance" options (the frontend writes them for `disable_any_whitespace` / `whitespace_pattern`) win.
JSON_DEFAULT_OPTIONS: dict[str, Any] = {"whitespace_flexible": False,
                                        "whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,40}"}


class GrammarError(ValueError):
    """The spec does not compile; the message says why."""


def grammar_from_spec(spec: StructuredOutputSpec) -> str:
    """The llguidance grammar text for `spec`; raises `GrammarError` when the spec is malformed.

    Only parses: `check_spec` (or building an `LLMatcher`) also validates the grammar."""
    kind, text = spec.kind, spec.spec
    try:
        if kind == "json":
            return LLMatcher.grammar_from_json_schema(text, defaults=JSON_DEFAULT_OPTIONS)  # type: ignore[arg-type]
        if kind == "json_object":
            return LLMatcher.grammar_from_json_schema('{"type": "object"}',
                                                      defaults=JSON_DEFAULT_OPTIONS)  # type: ignore[arg-type]
        if kind == "regex":  # `\d` means [0-9] (as in JSON schema patterns and other engines), not any digit
            return LLMatcher.grammar_from_lark(f"start: /{regex_to_lark(text, 'd')}/")
        if kind == "choice":
            choices = json.loads(text)
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
                raise GrammarError("choice must be a non-empty list of strings")
            return LLMatcher.grammar_from_lark("start: " + " | ".join(_lark_literal(c) for c in choices))
        if kind == "grammar":
            return LLMatcher.grammar_from_lark(any_to_lark(text))  # Lark as is; GBNF/EBNF (`::=`) converted
        if kind == "structural_tag":
            return _structural_tag_grammar(json.loads(text))
    except GrammarError:
        raise
    except Exception as exc:  # llguidance raises ValueError, the GBNF converter its own errors, json its own
        raise GrammarError(str(exc) or type(exc).__name__) from exc
    raise GrammarError(f"unknown structured output kind {kind!r} (expected one of {', '.join(KINDS)})")


@functools.lru_cache(maxsize=512)
def check_spec(spec: StructuredOutputSpec) -> str | None:
    """None when `spec` compiles, else the reason (cached: n samples of one request share one spec)."""
    try:
        grammar = grammar_from_spec(spec)
    except GrammarError as exc:
        return str(exc)
    error = LLMatcher.validate_grammar(grammar)
    return error.strip() or None


def _lark_literal(text: str) -> str:
    """A Lark string literal matching exactly `text` (an empty choice is the empty sequence)."""
    return json.dumps(text) if text else '""'


def _structural_tag_grammar(tag: Any) -> str:
    """vLLM's structural tag: {"type": "structural_tag", "structures": [{"begin", "schema", "end"}], "triggers"}:
    free text in which a trigger starts a tagged section whose body follows the structure's JSON schema."""
    if not isinstance(tag, dict):
        raise GrammarError("structural_tag must be an object with 'structures' and 'triggers'")
    structures, triggers = tag.get("structures"), tag.get("triggers")
    if not isinstance(structures, list) or not structures:
        raise GrammarError("structural_tag.structures must be a non-empty list")
    if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
        raise GrammarError("structural_tag.triggers must be a non-empty list of strings")
    tags = []
    for structure in structures:
        if not isinstance(structure, dict) or not isinstance(structure.get("begin"), str) \
                or not isinstance(structure.get("end", ""), str):
            raise GrammarError("each structural_tag structure needs string 'begin' and 'end'")
        begin = structure["begin"]
        trigger = next((t for t in triggers if begin.startswith(t)), None)
        if trigger is None:
            raise GrammarError(f"structure begin {begin!r} starts with none of the triggers {triggers}")
        schema = structure.get("schema", {})
        if not isinstance(schema, (dict, bool)):
            raise GrammarError("a structural_tag structure's schema must be a JSON schema object")
        tags.append(StructTag(trigger=trigger, begin=begin, grammar=json.dumps(schema), end=structure.get("end", "")))
    return StructTag.to_grammar(tags)
