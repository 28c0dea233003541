"""Builds a simulated executor from its configuration and profile: no torch, no weights, no KV tensors."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog

from executor_service.executor_config import ExecutorConfig
from executor_service.executor_info import ExecutorInfo, MeasuredSpeeds
from executor_service.persistent_batch import BatchLimits
from executor_service.simulation.simulated_runner import SimulatedRunner
from executor_service.simulation.step_time_profile import SimulatedModel, StepTimeProfile
from executor_service.tiny_tokenizer import EOS_TOKEN_ID, TINY_VOCAB_SIZE, write_tiny_tokenizer

log = structlog.get_logger(__name__)

TINY_TOKENIZER = "tiny"
# The number of prompt tokens the reported prefill speed is modelled at (the real executor measures 512).
PREFILL_PROBE_TOKENS = 512


@dataclass(frozen=True, slots=True)
class SimulatedTokenizer:
    """Where the scheduler finds the tokenizer (`Describe`'s model path) and what it decodes."""

    path: Path
    vocab_size: int
    eos_token_ids: tuple[int, ...]


def cache_root() -> Path:
    # The same cache `pagewire --model tiny` uses (pagewire.model_choice; services do not import the CLI).
    return Path(os.environ.get("PAGEWIRE_CACHE", Path.home() / ".cache" / "pagewire"))


def tiny_tokenizer_dir() -> Path:
    """The tiny byte-level tokenizer, written once into the cache; safe when many executors start at once
    (each writes a private copy and renames it into place; the first rename wins)."""
    target = cache_root() / "simulated-tokenizer-tiny"
    if (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".simulated-tokenizer-", dir=target.parent))
    write_tiny_tokenizer(scratch)
    try:
        os.rename(scratch, target)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def simulated_tokenizer(name: str) -> SimulatedTokenizer:
    if name != TINY_TOKENIZER:
        raise ValueError(f"profile tokenizer {name!r} is not known: use \"tiny\"")
    return SimulatedTokenizer(tiny_tokenizer_dir(), TINY_VOCAB_SIZE, (EOS_TOKEN_ID,))


class SimulatedExecutor:
    """The loaded simulated executor: a `LoadedExecutor` the real servicer serves."""

    def __init__(self, runner: SimulatedRunner, info: ExecutorInfo) -> None:
        self.runner = runner
        self.info = info

    def close(self) -> None:
        """Nothing to wait for: no device work."""

    @classmethod
    def load(cls, config: ExecutorConfig) -> SimulatedExecutor:
        """The executor `config.simulate` names. The KV pool is sized like a real one: the profile's KV
        memory (or --kv-cache-memory, or --num-gpu-blocks-override) in blocks of --block-size tokens;
        the host pool from --swap-space; batch limits from the flags."""
        assert config.simulate is not None
        profile = StepTimeProfile.load(config.simulate)
        tokenizer = simulated_tokenizer(profile.tokenizer)
        bytes_per_block = profile.kv_bytes_per_token * config.block_size
        kv_cache_bytes = config.kv_cache_memory_bytes or profile.kv_cache_bytes
        num_device_blocks = config.num_device_blocks_override or kv_cache_bytes // bytes_per_block
        num_host_blocks = int(config.swap_space_gib * 1024**3) // bytes_per_block
        if num_device_blocks < 1:
            raise ValueError(f"{kv_cache_bytes} bytes of KV cache hold no block of {bytes_per_block} bytes")
        limits = BatchLimits(
            vocab_size=tokenizer.vocab_size,
            block_size=config.block_size,
            num_device_blocks=num_device_blocks,
            num_host_blocks=num_host_blocks,
            max_model_len=profile.max_model_len,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            max_logprobs=config.max_logprobs,
        )
        runner = SimulatedRunner(
            profile.step_time, limits, bytes_per_block,
            profile.swap_out_bytes_per_second, profile.swap_in_bytes_per_second,
        )
        probe = min(PREFILL_PROBE_TOKENS, config.max_num_batched_tokens, profile.max_model_len)
        prefill_tokens_per_second = probe / profile.step_time.forward_seconds(probe, probe)
        model = SimulatedModel(
            name=f"simulated:{profile.name}",
            architecture=profile.architecture,
            num_layers=profile.num_layers,
            num_attention_heads=profile.num_attention_heads,
            num_kv_heads=profile.num_kv_heads,
            head_dim=profile.head_dim,
            hidden_size=profile.hidden_size,
            vocab_size=tokenizer.vocab_size,
            eos_token_ids=tokenizer.eos_token_ids,
        )
        info = ExecutorInfo(
            model_config=model,
            model_dir=str(tokenizer.path),
            dtype=profile.dtype,
            device_name=f"simulated {profile.device}",
            ops_backend="simulated",
            fingerprint=f"simulated:{config.simulate}",
            block_size=config.block_size,
            num_device_blocks=num_device_blocks,
            num_host_blocks=num_host_blocks,
            bytes_per_block=bytes_per_block,
            speeds=MeasuredSpeeds(
                profile.swap_out_bytes_per_second, profile.swap_in_bytes_per_second, prefill_tokens_per_second
            ),
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            max_logprobs=config.max_logprobs,
            max_model_len=profile.max_model_len,
        )
        log.info(
            "executor_simulated", profile=profile.name, device=info.device_name,
            num_device_blocks=num_device_blocks, num_host_blocks=num_host_blocks,
            prefill_tokens_per_second=round(prefill_tokens_per_second, 1), tokenizer=str(tokenizer.path),
        )
        return cls(runner, info)
