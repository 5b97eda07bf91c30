"""Chat templates: found, compiled and rendered the way Hugging Face does it, with Jinja2 alone.

Templates disagree on what a message's `content` is: some concatenate it as a string, others loop over a list
of `{"type": "text", ...}` parts. `detect_content_format` reads the template's syntax tree: if any loop
iterates over a message's content, messages are given as parts; otherwise text parts are joined into a string.
"""
from __future__ import annotations

import json
import logging
from collections import OrderedDict
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine_core.config import ModelConfig
from frontend.tokenizer import read_json

logger = logging.getLogger("conveyor.frontend")

ContentFormat = Literal["string", "openai"]


class ChatTemplateError(ValueError):
    """The template raised (`raise_exception`) or the messages do not fit it."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (llava-hf's and other training-era templates): transformers marks
    the assistant's tokens with it for loss masks; rendering a prompt only needs the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node | list[jinja2.nodes.Node]:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _is_content_lookup(node: jinja2.nodes.Node, aliases: set[str]) -> bool:
    """`message['content']`, `message.content`, or a name assigned from one of those."""
    if isinstance(node, jinja2.nodes.Getitem):
        return isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == "content"
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == "content"
    if isinstance(node, jinja2.nodes.Name):
        return node.name in aliases
    if isinstance(node, jinja2.nodes.Filter):  # e.g. `message['content'] | selectattr(...)`
        return node.node is not None and _is_content_lookup(node.node, aliases)
    return False


def detect_content_format(source: str, env: jinja2.Environment | None = None) -> ContentFormat:
    """"openai" (a list of parts) if the template loops over a message's content, else "string"."""
    env = env or make_environment()
    try:
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError:
        return "string"
    aliases: set[str] = set()
    for assign in tree.find_all(jinja2.nodes.Assign):
        if isinstance(assign.target, jinja2.nodes.Name) and _is_content_lookup(assign.node, aliases):
            aliases.add(assign.target.name)
    for loop in tree.find_all(jinja2.nodes.For):
        if _is_content_lookup(loop.iter, aliases):
            return "openai"
    return "string"


class ChatTemplate:
    """A compiled template plus the special-token strings it may use."""

    def __init__(self, source: str, special_tokens: dict[str, str | None]) -> None:
        self.source = source
        env = make_environment()
        self.content_format: ContentFormat = detect_content_format(source, env)
        self._template = env.from_string(source)
        self._special_tokens = {key: value or "" for key, value in special_tokens.items()}

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool,
               continue_final_message: bool = False, tools: list[Any] | None = None,
               documents: list[Any] | None = None, extra_kwargs: dict[str, Any] | None = None) -> str:
        """Render `messages` (content already in `self.content_format`); may raise ChatTemplateError."""
        if add_generation_prompt and continue_final_message:
            raise ChatTemplateError("add_generation_prompt and continue_final_message cannot both be true")
        variables: dict[str, Any] = {**self._special_tokens, **(extra_kwargs or {})}
        variables.update(messages=messages, tools=tools, documents=documents,
                         add_generation_prompt=add_generation_prompt)
        try:
            rendered = self._template.render(**variables)
        except ChatTemplateError:
            raise
        except Exception as exc:  # TemplateError, or e.g. a TypeError from `'text' + none` in the template
            raise ChatTemplateError(f"the chat template failed to render these messages: {exc}") from exc
        if continue_final_message:
            rendered = _cut_after_final_message(rendered, messages)
        return rendered


_REQUEST_TEMPLATES: OrderedDict[tuple[str, tuple[tuple[str, str | None], ...]], ChatTemplate] = OrderedDict()
_MAX_REQUEST_TEMPLATES = 32


def request_chat_template(source: str, special_tokens: dict[str, str | None]) -> ChatTemplate:
    """A request's own `chat_template`, compiled once and kept (LRU); ChatTemplateError if it does not compile."""
    key = (source, tuple(sorted(special_tokens.items())))
    template = _REQUEST_TEMPLATES.get(key)
    if template is not None:
        _REQUEST_TEMPLATES.move_to_end(key)
        return template
    try:
        template = ChatTemplate(source, special_tokens)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}") from exc
    _REQUEST_TEMPLATES[key] = template
    if len(_REQUEST_TEMPLATES) > _MAX_REQUEST_TEMPLATES:
        _REQUEST_TEMPLATES.popitem(last=False)
    return template


def _final_message_text(messages: list[dict[str, Any]]) -> str:
    content = messages[-1].get("content") if messages else None
    if isinstance(content, list):
        texts = [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        return texts[-1] if texts else ""
    return content if isinstance(content, str) else ""


def _cut_after_final_message(rendered: str, messages: list[dict[str, Any]]) -> str:
    """Drop what the template appends after the last message (end-of-turn tokens), as Hugging Face does."""
    final = _final_message_text(messages)
    if not final.strip():
        return rendered
    stripped = final.strip()
    if stripped not in rendered:
        raise ChatTemplateError("continue_final_message: the final message does not appear in the rendered chat")
    start = rendered.rindex(stripped)
    if rendered[start:start + len(final)] == final:
        return rendered[:start + len(final)]
    return rendered[:start + len(stripped)]


def _read_template_argument(value: str) -> str:
    """--chat-template is a file path or the template itself."""
    path = Path(value)
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except OSError:  # e.g. a long template is not a valid path
        pass
    return value


def _template_from_tokenizer_config(config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def load_chat_template(model_config: ModelConfig, special_tokens: dict[str, str | None]) -> ChatTemplate | None:
    """--chat-template, else tokenizer_config.json's `chat_template`, else chat_template.jinja; None if none."""
    folder = Path(model_config.tokenizer_dir)
    source: str | None = None
    origin = ""
    if model_config.chat_template:
        source, origin = _read_template_argument(model_config.chat_template), "--chat-template"
    if source is None:
        source, origin = _template_from_tokenizer_config(read_json(folder / "tokenizer_config.json")), \
            "tokenizer_config.json"
    if source is None and (folder / "chat_template.jinja").is_file():
        source, origin = (folder / "chat_template.jinja").read_text(encoding="utf-8"), "chat_template.jinja"
    if source is None:
        logger.warning("no chat template found in %s: /v1/chat/completions will answer 400", folder)
        return None
    template = ChatTemplate(source, special_tokens)
    logger.info("chat template from %s (message content given as %s)", origin,
                "a list of parts" if template.content_format == "openai" else "a string")
    return template


def load_score_template(model_config: ModelConfig, special_tokens: dict[str, str | None]) -> ChatTemplate | None:
    """--score-template (a file path or the template itself): renders the messages `{"role": "query"}` and
    `{"role": "document"}` into one prompt for a cross-encoder. None: the tokenizer's pair encoding."""
    if not model_config.score_template:
        return None
    return ChatTemplate(_read_template_argument(model_config.score_template), special_tokens)
