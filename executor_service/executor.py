"""Builds an executor from its configuration: device, weights, KV pool, sampler, runner, measured speeds."""

from __future__ import annotations

import time

import structlog
import torch

from executor_service.calibration import MeasuredSpeeds, measure_prefill, measure_swap
from executor_service.executor_config import DEFAULT_CPU_KV_CACHE_BYTES, ExecutorConfig
from executor_service.draft_model_runner import DraftModelRunner, open_draft_checkpoint
from executor_service.executor_info import DraftModelInfo, ExecutorInfo
from executor_service.kv_pool import KVGeometry, KVPool
from executor_service.lora.adapter_host_cache import AdapterHostCache
from executor_service.lora.lora_manager import LoraManager
from executor_service.lora.lora_slots import LoraSlots
from executor_service.model.config import ModelConfig
from executor_service.model.dtype import resolve_dtype
from executor_service.model.loader import open_checkpoint
from executor_service.model.weights_fingerprint import weights_fingerprint
from executor_service.model_runner import ModelRunner
from executor_service.ops import OpsBackend, create_ops_backend
from executor_service.persistent_batch import BatchLimits
from executor_service.sampler import Sampler

log = structlog.get_logger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    return device


def _num_device_blocks(config: ExecutorConfig, bytes_per_block: int, device: torch.device) -> int:
    """`bytes_per_block` covers every pool a block id addresses (the target's and a draft model's)."""
    if config.num_device_blocks_override is not None:
        return config.num_device_blocks_override
    if config.kv_cache_memory_bytes is not None:
        num_bytes = config.kv_cache_memory_bytes
    elif device.type == "cuda":
        free_bytes, total_bytes = torch.cuda.mem_get_info(device)
        used_bytes = total_bytes - free_bytes
        num_bytes = int(total_bytes * config.gpu_memory_utilization) - used_bytes
    else:
        num_bytes = DEFAULT_CPU_KV_CACHE_BYTES
    num_blocks = num_bytes // bytes_per_block
    if num_blocks < 1:
        raise ValueError(
            f"no memory left for the KV cache ({num_bytes} bytes for blocks of {bytes_per_block}); "
            "raise --gpu-memory-utilization or --kv-cache-memory"
        )
    return num_blocks


def _lora_manager(
    config: ExecutorConfig, model_config: ModelConfig, dtype: torch.dtype, device: torch.device, ops: OpsBackend
) -> LoraManager | None:
    if not config.enable_lora:
        return None
    host_cache = AdapterHostCache(model_config, config.max_lora_rank, config.max_cpu_loras)
    slots = LoraSlots(model_config, config.max_loras, config.max_lora_rank, dtype, device)
    ops.prepare_lora()
    return LoraManager(host_cache, slots, ops)


class Executor:
    """The loaded executor: a runner ready to execute plans and the facts `Describe` reports."""

    def __init__(self, runner: ModelRunner, info: ExecutorInfo) -> None:
        self.runner = runner
        self.info = info

    def close(self) -> None:
        """Waits for queued device work, so the process exits with nothing half-done on the GPU."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    @classmethod
    def load(cls, config: ExecutorConfig, ops: OpsBackend | None = None) -> Executor:
        """Loads the model and sizes the KV pool; `ops` overrides the backend `config.ops_backend` names."""
        if config.seed is not None:
            torch.manual_seed(config.seed)
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        device = resolve_device(config.device)
        checkpoint = open_checkpoint(config.model_dir)
        model_config = checkpoint.config
        speculative = config.speculative
        draft_checkpoint = (
            open_draft_checkpoint(speculative.model, model_config)
            if speculative is not None and speculative.uses_draft_model and speculative.model else None
        )
        dtype = resolve_dtype(config.dtype, model_config.torch_dtype, device)
        ops = ops if ops is not None else create_ops_backend(config.ops_backend, device.type)
        load_started = time.monotonic()
        model = checkpoint.load(dtype, device, ops)
        draft_model = None if draft_checkpoint is None else draft_checkpoint.load(dtype, device, ops)
        load_seconds = time.monotonic() - load_started
        geometry = KVGeometry(
            num_layers=model_config.num_layers,
            block_size=config.block_size,
            num_kv_heads=model_config.num_kv_heads,
            head_dim=model_config.head_dim,
            dtype=dtype,
        )
        draft_geometry = (
            None if draft_model is None else DraftModelRunner.geometry(draft_model.config, config.block_size, dtype)
        )
        bytes_per_block = geometry.bytes_per_block + (0 if draft_geometry is None else draft_geometry.bytes_per_block)
        num_device_blocks = _num_device_blocks(config, bytes_per_block, device)
        num_host_blocks = int(config.swap_space_gib * 1024**3) // bytes_per_block
        kv_pool = KVPool(geometry, num_device_blocks, num_host_blocks, device, ops)
        draft = None
        if draft_model is not None and draft_geometry is not None and speculative is not None:
            draft = DraftModelRunner(
                draft_model, KVPool(draft_geometry, num_device_blocks, num_host_blocks, device, ops),
                str(draft_checkpoint.path), speculative.num_speculative_tokens, config.max_num_batched_tokens,
            )
        max_model_len = model_config.max_model_len
        limits = BatchLimits(
            vocab_size=model_config.vocab_size,
            block_size=config.block_size,
            num_device_blocks=num_device_blocks,
            num_host_blocks=num_host_blocks,
            max_model_len=max_model_len,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            max_logprobs=config.max_logprobs,
            max_loras=config.max_loras if config.enable_lora else 0,
            max_model_drafts=0 if draft is None else draft.max_model_drafts,
        )
        sampler = Sampler(model_config.vocab_size, device, max_logprobs=config.max_logprobs, seed=config.seed)
        lora = _lora_manager(config, model_config, dtype, device, ops)
        runner = ModelRunner(model, kv_pool, sampler, limits, device, lora, draft)
        swap_out, swap_in = measure_swap(kv_pool)
        prefill = measure_prefill(
            runner, min(512, config.max_num_batched_tokens, max_model_len), model_config.vocab_size
        )
        speeds = MeasuredSpeeds(swap_out, swap_in, prefill)
        device_name = str(device)
        if device.type == "cuda":
            device_name = f"{device} ({torch.cuda.get_device_name(device)})"
        info = ExecutorInfo(
            model_config=model_config,
            model_dir=str(checkpoint.path),
            fingerprint=weights_fingerprint(checkpoint.path),
            dtype=str(dtype).removeprefix("torch."),
            device_name=device_name,
            ops_backend=ops.name,
            block_size=config.block_size,
            num_device_blocks=num_device_blocks,
            num_host_blocks=num_host_blocks,
            bytes_per_block=bytes_per_block,
            speeds=speeds,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            max_logprobs=config.max_logprobs,
            max_model_len=max_model_len,
            max_loras=limits.max_loras,
            max_lora_rank=config.max_lora_rank if config.enable_lora else 0,
            draft_model=None if draft is None else DraftModelInfo(
                name=draft.config.name, path=draft.path, num_layers=draft.config.num_layers,
                max_model_drafts=draft.max_model_drafts,
            ),
        )
        log.info(
            "executor_loaded",
            model=str(checkpoint.path),
            load_seconds=round(load_seconds, 2),
            device=device_name,
            dtype=str(dtype),
            ops=ops.name,
            num_device_blocks=num_device_blocks,
            num_host_blocks=num_host_blocks,
            swap_out_bytes_per_second=round(swap_out),
            swap_in_bytes_per_second=round(swap_in),
            prefill_tokens_per_second=round(prefill, 1),
            draft_model=None if draft is None else draft.path,
        )
        return cls(runner, info)
