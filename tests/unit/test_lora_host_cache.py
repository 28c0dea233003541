"""The executor's host cache of LoRA adapters: a hit reads no file, LRU eviction by count and bytes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from executor_service.lora.adapter_host_cache import AdapterHostCache
from executor_service.model.config import ModelConfig
from executor_service.tiny_model import create_tiny_model
from tests.helpers.peft_adapters import make_peft_adapter

MAX_RANK = 16


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("base"), seed=0)


@pytest.fixture(scope="module")
def model_config(base_dir: Path) -> ModelConfig:
    return ModelConfig.from_pretrained_dir(base_dir)


@pytest.fixture(scope="module")
def adapters(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three rank-4 q_proj adapters of equal size."""
    root = tmp_path_factory.mktemp("adapters")
    return [
        make_peft_adapter(base_dir, root / f"a{i}", rank=4, target_modules=["q_proj"], lora_alpha=8, seed=i)
        for i in range(3)
    ]


@pytest.fixture
def copies(adapters: list[Path], tmp_path: Path) -> list[Path]:
    """Private copies a test may delete."""
    return [Path(shutil.copytree(a, tmp_path / a.name)) for a in adapters]


ADAPTER_BYTES = 4 * 4 * (4 * 64 + 64 * 4)  # 4 layers of fp32 A [4, 64] and B [64, 4]


def test_hit_reads_no_file(model_config, copies):
    cache = AdapterHostCache(model_config, MAX_RANK, max_entries=None)
    first = cache.get("a", str(copies[0]))
    cache.check_integrity()
    assert (cache.num_reads, cache.num_hits, len(cache), cache.num_bytes) == (1, 0, 1, ADAPTER_BYTES)
    shutil.rmtree(copies[0])
    again = cache.get("a", str(copies[0]))
    cache.check_integrity()
    assert again is first
    assert (cache.num_reads, cache.num_hits) == (1, 1)


def test_key_is_name_and_path(model_config, copies):
    cache = AdapterHostCache(model_config, MAX_RANK, max_entries=None)
    cache.get("a", str(copies[0]))
    cache.get("b", str(copies[0]))
    cache.get("a", str(copies[1]))
    cache.check_integrity()
    assert cache.num_reads == 3
    assert cache.keys() == [("a", str(copies[0])), ("b", str(copies[0])), ("a", str(copies[1]))]


def test_entries_bound_evicts_least_recently_used(model_config, copies):
    cache = AdapterHostCache(model_config, MAX_RANK, max_entries=2)
    cache.get("a0", str(copies[0]))
    cache.get("a1", str(copies[1]))
    cache.get("a0", str(copies[0]))  # a0 becomes the most recently used
    cache.get("a2", str(copies[2]))
    cache.check_integrity()
    assert cache.keys() == [("a0", str(copies[0])), ("a2", str(copies[2]))]
    assert cache.num_bytes == 2 * ADAPTER_BYTES
    assert cache.num_reads == 3


def test_byte_budget_evicts_least_recently_used(model_config, copies):
    cache = AdapterHostCache(model_config, MAX_RANK, max_entries=None, max_bytes=2 * ADAPTER_BYTES + 1)
    for i, path in enumerate(copies):
        cache.get(f"a{i}", str(path))
        cache.check_integrity()
    assert cache.keys() == [("a1", str(copies[1])), ("a2", str(copies[2]))]
    assert cache.num_bytes == 2 * ADAPTER_BYTES


def test_adapter_over_the_budget_is_served_but_not_kept(model_config, copies):
    cache = AdapterHostCache(model_config, MAX_RANK, max_entries=None, max_bytes=ADAPTER_BYTES - 1)
    weights = cache.get("a0", str(copies[0]))
    cache.check_integrity()
    assert weights.config.rank == 4
    assert (len(cache), cache.num_bytes) == (0, 0)
    cache.get("a0", str(copies[0]))
    assert cache.num_reads == 2


def test_broken_adapter_raises_and_is_not_cached(model_config, copies):
    cache = AdapterHostCache(model_config, MAX_RANK, max_entries=None)
    (copies[0] / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="holds neither adapter_model.safetensors"):
        cache.get("a0", str(copies[0]))
    with pytest.raises(ValueError, match="'/etc/passwd' is not a directory"):
        cache.get("passwd", "/etc/passwd")
    cache.check_integrity()
    assert (len(cache), cache.num_bytes, cache.num_reads) == (0, 0, 2)
