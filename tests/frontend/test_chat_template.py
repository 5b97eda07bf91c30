"""Chat template loading, content-format detection and rendering (Hugging Face semantics)."""
from __future__ import annotations

from pathlib import Path

import pytest

from frontend.chat_template import ChatTemplate, ChatTemplateError, detect_content_format, load_chat_template
from frontend.generate.chat_prompt import message_for_template
from frontend.protocol import ChatMessage
from tests.frontend.conftest import model_config

SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": None, "pad_token": None}


def test_tiny_llama_template_takes_strings() -> None:
    template = load_chat_template(model_config("llama"), SPECIALS)
    assert template is not None and template.content_format == "string"


def test_tiny_qwen2_template_takes_parts() -> None:
    template = load_chat_template(model_config("qwen2"), SPECIALS)
    assert template is not None and template.content_format == "openai"


@pytest.mark.parametrize("source, expected", [
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "string"),
    ("{% for m in messages %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endfor %}", "openai"),
    ("{% for m in messages %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endfor %}", "openai"),
    ("{% for m in messages %}{% set c = m['content'] %}{% for p in c %}{{ p.text }}{% endfor %}{% endfor %}",
     "openai"),
    ("{% for m in messages %}{% for p in m['content'] | selectattr('type', 'equalto', 'text') %}"
     "{{ p.text }}{% endfor %}{% endfor %}", "openai"),
    ("{% for m in messages %}{{ m['content'] | trim }}{% endfor %}", "string"),
    ("{% if broken", "string"),
])
def test_detect_content_format(source: str, expected: str) -> None:
    assert detect_content_format(source) == expected


def render(model: str, messages: list[dict], **kwargs: object) -> str:
    template = load_chat_template(model_config(model), SPECIALS)
    assert template is not None
    prepared = [message_for_template(ChatMessage.model_validate(m), template.content_format) for m in messages]
    return template.render(prepared, **kwargs)  # type: ignore[arg-type]


def test_llama_joins_text_parts_into_a_string() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    text = render("llama", messages, add_generation_prompt=True)
    assert "<|im_start|>user\na\nb<|im_end|>\n" in text and text.endswith("<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # the SmolLM default system prompt


def test_qwen2_gets_string_content_as_parts() -> None:
    text = render("qwen2", [{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"


def test_continue_final_message_cuts_the_end_of_turn() -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello, I am"}]
    text = render("qwen2", messages, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nHello, I am")
    with pytest.raises(ChatTemplateError):
        render("qwen2", messages, add_generation_prompt=True, continue_final_message=True)


def test_helpers_variables_and_errors() -> None:
    source = ("{{ bos_token }}{{ messages | tojson }}{{ tools | tojson(indent=None) }}{{ flag }}"
              "{% if messages | length > 1 %}{{ raise_exception('too many') }}{% endif %}"
              "{{ strftime_now('%Y') | length }}")
    template = ChatTemplate(source, SPECIALS)
    text = template.render([{"role": "user", "content": "é"}], add_generation_prompt=True,
                           tools=[{"type": "function"}], extra_kwargs={"flag": "F"})
    assert text == '<s>[{"role": "user", "content": "é"}][{"type": "function"}]F4'
    with pytest.raises(ChatTemplateError, match="too many"):
        template.render([{"role": "user"}, {"role": "user"}], add_generation_prompt=True)


def test_template_argument_as_path_or_text(tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text("FILE{{ messages[0]['content'] }}")
    from_file = load_chat_template(model_config("llama", chat_template=str(path)), SPECIALS)
    from_text = load_chat_template(model_config("llama", chat_template="TEXT{{ eos_token }}"), SPECIALS)
    assert from_file is not None and from_file.render([{"content": "x"}], add_generation_prompt=False) == "FILEx"
    assert from_text is not None and from_text.render([], add_generation_prompt=False) == "TEXT</s>"


def test_tokenizer_config_template_wins_over_jinja_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": [{"name": "default", "template": "CFG"}]}')
    (tmp_path / "chat_template.jinja").write_text("FILE")
    template = load_chat_template(model_config("llama", tokenizer_dir=str(tmp_path)), SPECIALS)
    assert template is not None and template.source == "CFG"
    (tmp_path / "tokenizer_config.json").write_text("{}")
    template = load_chat_template(model_config("llama", tokenizer_dir=str(tmp_path)), SPECIALS)
    assert template is not None and template.source == "FILE"
    (tmp_path / "chat_template.jinja").unlink()
    assert load_chat_template(model_config("llama", tokenizer_dir=str(tmp_path)), SPECIALS) is None
