"""Start-up configuration of one executor: each field is also its `pagewire` flag (shared.setting)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.setting import parse_bytes, setting
from shared.speculative_config import SpeculativeConfig
from shared.tls import check_server_files

MAX_LORA_RANK_LIMIT = 256

DTYPES = ("auto", "float32", "bfloat16", "float16")
OPS_BACKENDS = ("auto", "torch", "cpu", "cuda")
BLOCK_SIZES = (8, 16, 32, 64, 128)
DEFAULT_CPU_KV_CACHE_BYTES = 512 * 1024**2


@dataclass(frozen=True, slots=True)
class ExecutorConfig:
    """How to start an executor. Exactly one way of sizing the KV pool wins, in this order:
    `num_device_blocks_override`, `kv_cache_memory_bytes`, `gpu_memory_utilization` (CUDA) or the CPU
    default of `DEFAULT_CPU_KV_CACHE_BYTES`. Torch-free, so the CLI parser builds without torch.
    """

    model_dir: str = setting(
        help="Hugging Face checkpoint directory, a .gguf file or a directory holding one", flag="--model"
    )
    host: str = setting("127.0.0.1", help="address the internal Executor API listens on")
    port: int = setting(50061, help="port of the internal Executor API")
    device: str = setting("auto", help="auto (cuda when visible, else cpu), cpu or cuda[:N]")
    dtype: str = setting("auto", choices=DTYPES, help="weights and KV cache dtype (auto: the checkpoint's)")
    block_size: int = setting(16, help="tokens per KV block (8, 16, 32, 64 or 128)")
    kv_cache_memory_bytes: int | None = setting(
        None, flag="--kv-cache-memory", parse=parse_bytes, metavar="BYTES",
        help="memory for the KV cache, e.g. 512MiB or 2GiB (wins over --gpu-memory-utilization)",
        default_text=f"CPU: {DEFAULT_CPU_KV_CACHE_BYTES // 1024**2} MiB, CUDA: from --gpu-memory-utilization",
    )
    gpu_memory_utilization: float = setting(
        0.9, help="CUDA: fraction of the device's memory for weights, activations and the KV cache"
    )
    num_device_blocks_override: int | None = setting(
        None, flag="--num-gpu-blocks-override", help="exact number of KV blocks (wins over the memory flags)",
        default_text="sized from memory",
    )
    swap_space_gib: float = setting(1.0, flag="--swap-space",
        help="GiB of host memory for swapped-out blocks")
    max_num_batched_tokens: int = setting(8192, help="most tokens the executor accepts in one step")
    max_num_seqs: int = setting(256, help="most sequences the executor accepts in one step")
    max_logprobs: int = setting(20, help="most logprobs a request may ask for per token")
    ops_backend: str = setting(
        "auto", flag="--attention-backend", choices=OPS_BACKENDS,
        help="attention and cache kernels: torch (reference), cpu (compiled C++ attention, batch-invariant), "
        "cuda (CuPy kernels), auto (cuda on CUDA, else cpu when it builds, else torch)",
    )
    seed: int | None = setting(
        None, help="seeds the sampler's draws for requests without a seed of their own, so a restarted "
        "executor given the same requests samples the same tokens", default_text="random per start",
    )
    num_threads: int | None = setting(None, help="torch CPU threads", default_text="torch's choice")
    executor_lease_seconds: float = setting(
        10.0, help="how long the scheduler that owned this executor keeps it after its Step stream ends: "
        "only the same --scheduler-id may reconnect meanwhile",
    )
    drain_timeout_seconds: float = setting(
        30.0, help="on SIGTERM: health turns NOT_SERVING (no new work) and the Step stream is served until its "
        "scheduler closes it (no sequence left here) or this many seconds pass, then the executor exits",
    )
    executor_token: str | None = setting(
        None, help="require `authorization: Bearer TOKEN` on Describe and Step (env PAGEWIRE_EXECUTOR_TOKEN); "
        "health stays open", default_text="none, open to anyone who reaches the port; `pagewire serve`: random",
    )
    tls_cert: str | None = setting(
        None, metavar="PEM", help="serve the Executor API over TLS with this certificate (chain); schedulers "
        "then need --executor-tls-ca", default_text="plaintext",
    )
    tls_key: str | None = setting(None, metavar="PEM", help="the private key of --tls-cert", default_text="none")
    tls_client_ca: str | None = setting(
        None, metavar="PEM", help="mutual TLS: accept only schedulers whose certificate this CA signed (their "
        "--executor-tls-client-cert)", default_text="any scheduler",
    )
    enable_lora: bool = setting(False, help="serve LoRA adapters (PEFT format) beside the base model")
    max_loras: int = setting(4, help="LoRA: adapter slots on the device, i.e. most distinct adapters in one step")
    max_lora_rank: int = setting(16, help=f"LoRA: largest adapter rank served (1 to {MAX_LORA_RANK_LIMIT})")
    max_cpu_loras: int | None = setting(
        None, help="LoRA: most adapters kept in the executor's host cache (a re-load from it reads no file)",
        default_text="no count bound; at most 1 GiB of adapters",
    )
    speculative_config: str | None = setting(
        None, metavar="JSON", help='speculative decoding, as the scheduler\'s flag: with \'{"method": "draft_model", '
        '"model": DIR, "num_speculative_tokens": 4}\' this executor loads the draft model DIR (same vocabulary as '
        "the target) with its own KV pool under the same block ids; other methods need nothing here",
        default_text="off",
    )
    simulate: str | None = setting(
        None, metavar="PROFILE", help="serve no model: answer plans with deterministic tokens after the step "
        "time PROFILE models (a name in executor_service/simulation/profiles, e.g. h100_llama3_8b, or a JSON "
        "file); --model is not used", default_text="off, a real model",
    )

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"--block-size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.ops_backend not in OPS_BACKENDS:
            raise ValueError(f"--attention-backend must be auto, torch, cpu or cuda, got {self.ops_backend!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"--kv-cache-memory must be positive, got {self.kv_cache_memory_bytes}")
        if self.num_device_blocks_override is not None and self.num_device_blocks_override <= 0:
            raise ValueError(
                f"--num-gpu-blocks-override must be positive, got {self.num_device_blocks_override}"
            )
        if self.swap_space_gib < 0:
            raise ValueError(f"--swap-space must be >= 0 GiB, got {self.swap_space_gib}")
        if self.max_num_batched_tokens <= 0 or self.max_num_seqs <= 0:
            raise ValueError("--max-num-batched-tokens and --max-num-seqs must be positive")
        if self.executor_lease_seconds < 0:
            raise ValueError(f"--executor-lease-seconds must be >= 0, got {self.executor_lease_seconds}")
        if self.drain_timeout_seconds < 0:
            raise ValueError(f"--drain-timeout-seconds must be >= 0, got {self.drain_timeout_seconds}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"--num-threads must be at least 1, got {self.num_threads}")
        if self.max_loras < 1:
            raise ValueError(f"--max-loras must be at least 1, got {self.max_loras}")
        if not 1 <= self.max_lora_rank <= MAX_LORA_RANK_LIMIT:
            raise ValueError(f"--max-lora-rank must be in [1, {MAX_LORA_RANK_LIMIT}], got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < 1:
            raise ValueError(f"--max-cpu-loras must be at least 1, got {self.max_cpu_loras}")
        check_server_files(self.tls_cert, self.tls_key, self.tls_client_ca)
        if self.speculative_config is not None:
            SpeculativeConfig.parse(self.speculative_config)

    @property
    def speculative(self) -> SpeculativeConfig | None:
        return None if self.speculative_config is None else SpeculativeConfig.parse(self.speculative_config)

