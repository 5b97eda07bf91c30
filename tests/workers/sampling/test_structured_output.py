"""Rank 0's grammar matchers (workers/sampling/structured_output.py), alone on random logits and inside the ModelRunner:
masks follow the grammar and end in EOS, padding ids stay masked, a bad spec fails only its request, and a
request re-sent after preemption continues its grammar where it was."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from engine_core.config import CacheConfig, ModelConfig
from engine_core.protocol import NewRequestData, SamplingParams, SchedulerOutput, StructuredOutputSpec
from tests.workers.harness import RunnerDriver, prompt_ids
from workers.model_runner import ModelRunner
from workers.sampling.state import RequestSamplingState, make_sampling_state
from workers.sampling.structured_output import StructuredOutputs

torch.set_num_threads(1)

EOS = 2
PHONE = r"\d{3}-\d{4}"
VOCAB = 49152


@pytest.fixture(scope="module")
def llama_path(tiny_models: Path) -> str:
    return str(tiny_models / "llama")


@pytest.fixture(scope="module")
def tokenizer(llama_path: str) -> Tokenizer:
    return Tokenizer.from_file(str(Path(llama_path) / "tokenizer.json"))


@pytest.fixture(scope="module")
def outputs(llama_path: str) -> StructuredOutputs:
    return StructuredOutputs(llama_path, [EOS], torch.device("cpu"))


def constrained(kind: str, spec: str = "", output_token_ids: list[int] | None = None,
                **params: object) -> RequestSamplingState:
    sampling = SamplingParams(structured_output=StructuredOutputSpec(kind, spec), **params)  # type: ignore[arg-type]
    return make_sampling_state(sampling, [1, 2, 3], list(output_token_ids or []), EOS, "cpu")


def run_to_eos(outputs: StructuredOutputs, states: dict[str, RequestSamplingState], extra_columns: int = 0,
               max_steps: int = 200, seed: int = 0) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Drive the matchers with random logits (argmax) until each request samples EOS; return the tokens before
    EOS and the errors."""
    generator = torch.Generator().manual_seed(seed)
    done: dict[str, list[int]] = {}
    errors: dict[str, str] = {}
    for _ in range(max_steps):
        live = [(rid, state) for rid, state in states.items() if rid not in done and rid not in errors]
        if not live:
            break
        pending = outputs.start(live, states.keys())
        assert pending is not None
        logits = torch.randn(len(live), VOCAB + extra_columns, generator=generator) * 4
        row_errors = outputs.apply(pending, logits)
        if extra_columns:
            assert torch.isneginf(logits[:, VOCAB:]).all()  # ids past the tokenizer (model padding) never allowed
        for row, (rid, state) in enumerate(live):
            if row in row_errors:
                errors[rid] = row_errors[row]
                continue
            token_id = int(logits[row].argmax())
            assert torch.isfinite(logits[row, token_id])
            error = outputs.advance(rid, token_id)
            if error is not None:
                errors[rid] = error
            elif token_id == EOS:
                done[rid] = list(state.output_token_ids)
            else:
                state.output_token_ids.append(token_id)
    return done, errors


def test_masks_follow_each_grammar_and_end_with_eos(outputs: StructuredOutputs, tokenizer: Tokenizer) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "c": {"enum": ["x", "y"]}},
              "required": ["n", "c"], "additionalProperties": False}
    states = {"regex": constrained("regex", PHONE), "choice": constrained("choice", json.dumps(["cat", "dog"])),
              "json": constrained("json", json.dumps(schema)),
              "grammar": constrained("grammar", 'root ::= "(" [0-9]{1,2} ("+" [0-9]{1,2})? ")"')}
    done, errors = run_to_eos(outputs, states, extra_columns=64)
    assert not errors and set(done) == set(states)
    text = {rid: tokenizer.decode(ids) for rid, ids in done.items()}
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", text["regex"]), text  # \d means ASCII digits
    assert text["choice"] in ("cat", "dog")
    value = json.loads(text["json"])
    assert set(value) == {"n", "c"} and 0 <= value["n"] <= 99 and value["c"] in ("x", "y")
    assert re.fullmatch(r"\([0-9]{1,2}(\+[0-9]{1,2})?\)", text["grammar"]), text


def test_unconstrained_rows_are_left_alone(outputs: StructuredOutputs) -> None:
    free = make_sampling_state(SamplingParams(), [1], [], EOS, "cpu")
    assert outputs.start([("free", free)], {"free"}) is None
    pending = outputs.start([("free", free), ("re", constrained("regex", "ab"))], {"free", "re"})
    assert pending is not None
    logits = torch.zeros(2, VOCAB)
    assert outputs.apply(pending, logits) == {}
    assert torch.equal(logits[0], torch.zeros(VOCAB))
    assert int(torch.isfinite(logits[1]).sum()) >= 1 and int(torch.isfinite(logits[1]).sum()) < 10


def test_packed_path_gives_the_same_masks(outputs: StructuredOutputs, llama_path: str) -> None:
    """On CPU the mask is unpacked on the background thread; elsewhere (CUDA) the packed words go to the logits'
    device and are unpacked there. Both must mask the same ids (the packed path runs on CPU logits here)."""
    packed = StructuredOutputs(llama_path, [EOS], torch.device("cuda"))  # no CUDA call: only the code path
    try:
        for spec in (StructuredOutputSpec("regex", PHONE), StructuredOutputSpec("json_object")):
            masked = []
            for manager in (outputs, packed):
                free = make_sampling_state(SamplingParams(), [1], [], EOS, "cpu")
                state = make_sampling_state(SamplingParams(structured_output=spec), [1], [], EOS, "cpu")
                pending = manager.start([("free", free), ("c", state)], {"free", "c"})
                assert pending is not None
                logits = torch.zeros(2, VOCAB + 7)
                assert manager.apply(pending, logits) == {}
                masked.append(logits)
            assert torch.equal(masked[0], masked[1])
            assert torch.equal(masked[0][0], torch.zeros(VOCAB + 7))
            assert torch.isneginf(masked[0][1, VOCAB:]).all() and torch.isfinite(masked[0][1]).any()
    finally:
        packed.close()


def test_a_bad_spec_fails_only_its_request(outputs: StructuredOutputs) -> None:
    states = {"bad_regex": constrained("regex", "a(b"), "bad_kind": constrained("nonsense", "x"),
              "good": constrained("regex", "[ab]{2}")}
    done, errors = run_to_eos(outputs, states)
    assert set(errors) == {"bad_regex", "bad_kind"} and "good" in done
    assert "regex" in errors["bad_regex"] and "nonsense" in errors["bad_kind"]


def test_finished_grammar_allows_only_eos_even_with_ignore_eos(outputs: StructuredOutputs,
                                                               tokenizer: Tokenizer) -> None:
    state = constrained("choice", json.dumps(["yes"]), ignore_eos=True)
    states = {"r": state}
    for step in range(6):  # "yes" then EOS forever (ignore_eos: the request goes on to max_tokens)
        pending = outputs.start(list(states.items()), states.keys())
        assert pending is not None
        logits = torch.zeros(1, VOCAB)
        outputs.apply(pending, logits)
        allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
        token_id = allowed[0]
        if tokenizer.decode(state.output_token_ids) == "yes":
            assert allowed == [EOS]
        assert outputs.advance("r", token_id) is None
        state.output_token_ids.append(token_id)
    assert tokenizer.decode(state.output_token_ids, skip_special_tokens=False).startswith("yes")


def test_structural_tag_constrains_only_the_tagged_section(outputs: StructuredOutputs,
                                                           tokenizer: Tokenizer) -> None:
    tag = {"type": "structural_tag", "triggers": ["<function="],
           "structures": [{"begin": "<function=weather>", "end": "</function>",
                           "schema": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                                      "required": ["city"], "additionalProperties": False}}]}
    prefix = tokenizer.encode("Let me check. <function=weather>", add_special_tokens=False).ids
    state = constrained("structural_tag", json.dumps(tag), output_token_ids=prefix)  # replayed on first use
    generator = torch.Generator().manual_seed(1)
    for _ in range(60):
        pending = outputs.start([("tag", state)], {"tag"})
        assert pending is not None
        logits = torch.randn(1, VOCAB, generator=generator) * 4
        assert outputs.apply(pending, logits) == {}
        token_id = int(logits[0].argmax())
        assert outputs.advance("tag", token_id) is None
        state.output_token_ids.append(token_id)
        if "</function>" in tokenizer.decode(state.output_token_ids):
            break
    text = tokenizer.decode(state.output_token_ids)
    body = text.split("<function=weather>", 1)[1].split("</function>", 1)[0]
    assert json.loads(body)["city"] in ("Paris", "Oslo"), text


# --------------------------------------------------------------------------- inside the model runner


def make_runner(llama_path: str) -> tuple[ModelRunner, RunnerDriver]:
    model_config = ModelConfig(model=llama_path, served_model_name="test", tokenizer_dir=llama_path,
                               architecture="", max_model_len=512, eos_token_ids=(EOS,))
    runner = ModelRunner(model_config, CacheConfig(block_size=4, num_blocks_override=128), torch.device("cpu"))
    runner.initialize_cache(runner.determine_num_blocks())
    return runner, RunnerDriver(runner, 128)


def test_runner_masks_and_replays_after_preemption(llama_path: str, tokenizer: Tokenizer) -> None:
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=100,
                            structured_output=StructuredOutputSpec("regex", PHONE))
    runner, driver = make_runner(llama_path)
    prompt = prompt_ids(8, 0)
    driver.add("p", prompt, params)
    driver.add("free", prompt_ids(8, 1), SamplingParams(temperature=1.0, seed=6))
    driver.generate(["p", "free"], 3)
    generated = list(driver.requests["p"].output_token_ids)
    # Preempt "p": the runner forgets it, then gets it anew with prompt + generated tokens (recompute).
    driver.finish(["p"])
    driver.step({"free": 1})
    assert "p" not in runner.requests
    driver.add("p2", prompt + generated, params, num_prompt_tokens=len(prompt))
    while not driver.requests["p2"].output_token_ids or driver.requests["p2"].output_token_ids[-1] != EOS:
        driver.step({"p2": len(driver.requests["p2"].token_ids) - driver.requests["p2"].num_computed_tokens})
    text = tokenizer.decode(generated + driver.requests["p2"].output_token_ids[:-1])
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", text), text


def test_runner_fails_only_the_request_whose_spec_breaks(llama_path: str) -> None:
    runner, _ = make_runner(llama_path)
    bad = SamplingParams(structured_output=StructuredOutputSpec("grammar", "start: undefined_rule"))
    good = SamplingParams(temperature=0.0, structured_output=StructuredOutputSpec("choice", '["ok"]'))
    prompt = prompt_ids(6, 2)
    output = runner.execute(SchedulerOutput(
        [NewRequestData("bad", prompt, 6, bad, [0, 1], 0), NewRequestData("good", prompt, 6, good, [2, 3], 0)],
        [], {"bad": 6, "good": 6}, []))
    assert output.error is None
    assert output.sampled_token_ids[0] == [] and output.request_errors is not None
    assert "undefined_rule" in output.request_errors["bad"]
    assert len(output.sampled_token_ids[1]) == 1 and "good" not in output.request_errors
