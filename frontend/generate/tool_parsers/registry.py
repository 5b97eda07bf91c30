"""Tool-call parsers by name (`--tool-call-parser NAME`, vLLM's names)."""
from __future__ import annotations

from typing import Callable, TypeVar

from frontend.generate.tool_parsers.base import ToolParser

_PARSERS: dict[str, type[ToolParser]] = {}

P = TypeVar("P", bound=type[ToolParser])


def register_tool_parser(name: str) -> Callable[[P], P]:
    def register(cls: P) -> P:
        cls.name = name
        _PARSERS[name] = cls
        return cls
    return register


def tool_parser_names() -> list[str]:
    return sorted(_PARSERS)


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class registered as `name`; KeyError (listing the known names) otherwise."""
    try:
        return _PARSERS[name]
    except KeyError:
        raise KeyError(f"unknown tool call parser {name!r}; choose one of {', '.join(tool_parser_names())}") from None
