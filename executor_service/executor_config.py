"""Start-up configuration of one executor, as given on the command line."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ExecutorConfig:
    """How to start an executor. Exactly one way of sizing the KV pool wins, in this order:
    `num_device_blocks_override`, `kv_cache_memory_bytes`, `gpu_memory_utilization` (CUDA) or the CPU
    default of `DEFAULT_CPU_KV_CACHE_BYTES`.
    """

    model_dir: str
    host: str = "127.0.0.1"
    port: int = 50061
    device: str = "auto"
    dtype: str = "auto"
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    num_device_blocks_override: int | None = None
    swap_space_gib: float = 1.0
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    max_logprobs: int = 20
    ops_backend: str = "auto"
    seed: int = 0
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"--block-size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"--kv-cache-memory must be positive, got {self.kv_cache_memory_bytes}")
        if self.num_device_blocks_override is not None and self.num_device_blocks_override <= 0:
            raise ValueError(f"--num-gpu-blocks-override must be positive, got {self.num_device_blocks_override}")
        if self.swap_space_gib < 0:
            raise ValueError(f"--swap-space must be >= 0 GiB, got {self.swap_space_gib}")
        if self.max_num_batched_tokens <= 0 or self.max_num_seqs <= 0:
            raise ValueError("--max-num-batched-tokens and --max-num-seqs must be positive")


DEFAULT_CPU_KV_CACHE_BYTES = 512 * 1024**2
