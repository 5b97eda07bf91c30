"""Pooling-model variants built on the fly: RoBERTa (position offset, its own classification head), a causal LM
carrying `score.weight` served with `convert="classify"`, and encoders split over two tensor-parallel ranks."""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine_core.config import PoolerConfig
from engine_core.protocol import PoolingParams
from tests.workers.harness import prompt_ids
from tests.workers.models.test_pooling_models import (CLASSIFIER_POOLER, EMBED_POOLER, TOLERANCE, hf_model,
                                                      make_runner, pooled)

torch.set_num_threads(1)


def _write_tiny_roberta(folder: Path, classifier: bool) -> None:
    from transformers import AutoModel, AutoModelForSequenceClassification, RobertaConfig

    config = RobertaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
                           initializer_range=0.2, num_labels=3)
    torch.manual_seed(7)
    auto_class = AutoModelForSequenceClassification if classifier else AutoModel
    auto_class.from_config(config, dtype=torch.float32).save_pretrained(folder)


@pytest.mark.parametrize("classifier", [False, True])
def test_roberta_matches_transformers(tmp_path: Path, classifier: bool) -> None:
    folder = tmp_path / "roberta"
    _write_tiny_roberta(folder, classifier)
    prompts = {"a": [0] + list(range(5, 30)) + [2], "b": [0, 7, 8, 9, 2]}  # no padding id (1) inside
    task = "classify" if classifier else "token_embed"
    pooler = CLASSIFIER_POOLER if classifier else PoolerConfig(pooling_type="CLS", normalize=False)
    results = pooled({r: (ids, PoolingParams(task=task)) for r, ids in prompts.items()},
                     make_runner(str(folder), pooler, max_model_len=64))
    kind = "AutoModelForSequenceClassification" if classifier else "AutoModel"
    for request_id, token_ids in prompts.items():
        with torch.no_grad():
            out = hf_model(str(folder), kind)(torch.tensor([token_ids]))
        expected = out.logits[0].softmax(-1) if classifier else out.last_hidden_state[0]
        torch.testing.assert_close(results[request_id], expected, atol=TOLERANCE, rtol=0)


def test_convert_classify_uses_the_checkpoints_score_head(tiny_models: Path, tmp_path: Path) -> None:
    """A causal-LM checkpoint with an extra `score.weight` (as some reward models ship): score(last hidden)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "llama-with-score"
    shutil.copytree(tiny_models / "llama", folder)
    tensors = load_file(str(folder / "model.safetensors"))
    score = torch.randn(4, 64, generator=torch.Generator().manual_seed(3)) * 0.3  # [num_labels, hidden]
    save_file({**tensors, "score.weight": score}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    token_ids = prompt_ids(11, 4)
    results = pooled({"x": (token_ids, PoolingParams(task="classify", use_activation=False))},
                     make_runner(str(folder), PoolerConfig(pooling_type="LAST", num_labels=4), convert="classify",
                                 block_size=4), chunk=6)
    with torch.no_grad():
        hidden = hf_model(str(tiny_models / "llama"), "LlamaModel")(torch.tensor([token_ids])).last_hidden_state
    torch.testing.assert_close(results["x"], hidden[0, -1] @ score.T, atol=TOLERANCE, rtol=0)


# --------------------------------------------------------------------------- tensor parallel


def _tp_worker(rank: int, world_size: int, port: int, tiny_models: str, out_dir: str) -> None:
    """One rank: the tiny BERT embedder and classifier through the ModelRunner; rank 0 saves the results."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    results: dict[str, list[float] | list[list[float]]] = {}
    cases = [("bert-embed", EMBED_POOLER, "embed"), ("bert-classifier", CLASSIFIER_POOLER, "classify")]
    for name, pooler, task in cases:
        from engine_core.config import CacheConfig, ModelConfig
        from tests.workers.models.test_pooling_models import PoolingDriver
        from workers.model_runner import ModelRunner

        path = os.path.join(tiny_models, name)
        model_config = ModelConfig(model=path, served_model_name="t", tokenizer_dir=path, architecture="",
                                   runner="pooling", pooler=pooler)
        runner = ModelRunner(model_config, CacheConfig(num_blocks_override=32), torch.device("cpu"), rank,
                             world_size)
        runner.initialize_cache(32)
        driver = PoolingDriver(runner, 32)
        driver.add("a", [101] + [1000 + token_id % 29000 for token_id in prompt_ids(9, 0)] + [102],
                   PoolingParams(task=task))
        driver.add("b", [101, 2000, 2001, 102], PoolingParams(task=task))
        output = driver.step({"a": 11, "b": 4})
        if rank == 0:
            assert output.pooling_outputs is not None
            results.update({f"{name}-{r}": result.to_list() for r, result in driver.results.items()})
        else:
            assert output.pooling_outputs is None  # only rank 0 answers
    if rank == 0:
        torch.save(results, os.path.join(out_dir, f"tp{world_size}.pt"))
    dist.barrier()  # leave together, then skip teardown (see test_model_runner's tensor-parallel test)
    os._exit(0)


def test_encoders_over_two_tensor_parallel_ranks_match_one(tiny_models: Path, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    for world_size in (1, 2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(_tp_worker, args=(world_size, port, str(tiny_models), str(tmp_path)), nprocs=world_size)
    single, sharded = torch.load(tmp_path / "tp1.pt"), torch.load(tmp_path / "tp2.pt")
    assert set(single) == set(sharded) and len(single) == 4
    for key, values in single.items():
        torch.testing.assert_close(torch.tensor(sharded[key]), torch.tensor(values), atol=1e-5, rtol=0)
    assert F.cosine_similarity(torch.tensor(single["bert-embed-a"]), torch.tensor(single["bert-embed-b"]), dim=0) < 1
