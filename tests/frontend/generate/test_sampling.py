"""generation_config.json defaults, EOS handling and SamplingParams building."""
from __future__ import annotations

import json
from pathlib import Path

from frontend.generate.protocol import CompletionRequest
from frontend.generate.sampling import build_sampling_params, default_max_tokens
from frontend.generation_config import EosConfig, load_generation_defaults
from frontend.tokenizer import TokenizerInfo
from tests.frontend.conftest import model_config, model_dir


def test_generation_config_defaults_from_the_model_folder() -> None:
    defaults = load_generation_defaults(model_config("llama"))
    assert defaults == {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.0}
    assert load_generation_defaults(model_config("llama", generation_config="vllm")) == {}


def test_generation_config_from_another_folder(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": 5, "max_new_tokens": 7, "do_sample": True}))
    defaults = load_generation_defaults(model_config("llama", generation_config=str(tmp_path)))
    assert defaults == {"top_k": 5, "max_tokens": 7}
    assert default_max_tokens(None, defaults, 16) == 7
    assert default_max_tokens(None, defaults, 3) == 3
    assert default_max_tokens(100, defaults, 16) == 100


def test_request_values_override_defaults_and_eos_ids_go_to_stop_tokens() -> None:
    tokenizer = TokenizerInfo(str(model_dir("llama")))
    eos = EosConfig.from_model(model_config("llama", eos_token_ids=(2, 0)), tokenizer)
    assert eos.eos_token_id == 2 and eos.extra_stop_token_ids == (0,)
    request = CompletionRequest(prompt="x", top_p=0.5, seed=10, stop_token_ids=[7], logit_bias={"5": 150})
    params = build_sampling_params(request, {"temperature": 0.7, "top_p": 0.9}, eos, tokenizer,
                                   max_tokens=9, logprobs=2, seed_offset=3)
    assert (params.temperature, params.top_p, params.seed, params.max_tokens, params.logprobs) == (0.7, 0.5, 13, 9, 2)
    assert params.stop_token_ids == [7, 0] and params.logit_bias == {5: 100.0}


def test_tokenizer_eos_is_the_fallback() -> None:
    tokenizer = TokenizerInfo(str(model_dir("llama")))
    eos = EosConfig.from_model(model_config("llama", eos_token_ids=()), tokenizer)
    assert eos.eos_token_id == tokenizer.tokenizer.token_to_id("<|im_end|>") and eos.extra_stop_token_ids == ()
