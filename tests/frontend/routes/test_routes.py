"""/tokenize, /detokenize, /v1/models, /health, /version, /metrics."""
from __future__ import annotations

import httpx
import openai

from frontend.tokenizer import TokenizerInfo
from tests.frontend.conftest import MAX_MODEL_LEN, SERVED_NAME, model_dir


def test_tokenize_prompt_and_detokenize(http: httpx.Client) -> None:
    tokenizer = TokenizerInfo(str(model_dir("llama")))
    body = http.post("/tokenize", json={"model": SERVED_NAME, "prompt": "Hello 日本",
                                        "return_token_strs": True}).json()
    assert body["tokens"] == tokenizer.encode("Hello 日本", True)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_MODEL_LEN
    assert body["token_strs"][0] == "Hello"
    assert http.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": "Hello 日本"}


def test_tokenize_messages_uses_the_chat_template(http: httpx.Client) -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]
    body = http.post("/tokenize", json={"messages": messages}).json()
    text = TokenizerInfo(str(model_dir("llama"))).decode(body["tokens"], skip_special_tokens=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n"
    body = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert body["count"] == len(body["tokens"]) < len(TokenizerInfo(str(model_dir("llama"))).encode(text, False))


def test_tokenize_errors(http: httpx.Client) -> None:
    assert http.post("/detokenize", json={"tokens": [10**8]}).json()["error"]["param"] == "tokens"
    assert http.post("/tokenize", json={}).json()["error"]["param"] == "prompt"
    assert http.post("/tokenize", json={"messages": []}).status_code == 400
    assert http.post("/tokenize", json={"prompt": "x", "model": "other"}).status_code == 404


def test_models_health_version(client: openai.OpenAI, http: httpx.Client) -> None:
    models = client.models.list()
    assert [model.id for model in models.data] == [SERVED_NAME]
    assert models.data[0].model_extra["max_model_len"] == MAX_MODEL_LEN  # type: ignore[index]
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]


def test_metrics(client: openai.OpenAI, http: httpx.Client) -> None:
    assert 'conveyor:generation_tokens_total{model_name="tiny-llama"}' in http.get("/metrics").text  # exported at 0 too
    client.completions.create(model=SERVED_NAME, prompt="x", max_tokens=3)
    text = http.get("/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries",
                 "prefix_cache_hits", "engine_steps", "engine_scheduled_requests", "max_requests_in_step",
                 "num_preemptions", "prompt_tokens_total", "generation_tokens_total", "request_success_total",
                 "time_to_first_token_seconds_bucket", "time_per_output_token_seconds_count",
                 "e2e_request_latency_seconds_sum"):
        assert f"conveyor:{name}" in text and f"vllm:{name}" in text, name
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    model = f'{{model_name="{SERVED_NAME}"}}'
    engine = f'{{engine="0",model_name="{SERVED_NAME}"}}'  # engine gauges: one series per data-parallel rank
    assert values[f"conveyor:num_requests_waiting{engine}"] == 1.0  # from the fake core's stats
    assert values[f"conveyor:num_preemptions{engine}"] == 2.0
    assert values[f"conveyor:generation_tokens_total{model}"] >= 3
    assert values[f'conveyor:request_success_total{{finished_reason="length",model_name="{SERVED_NAME}"}}'] >= 1
