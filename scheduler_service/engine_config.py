"""The scheduler's start-up configuration; each field is also its `pagewire` flag (shared.setting)."""

from __future__ import annotations

from dataclasses import dataclass

from scheduler_service.executor_channel import ExecutorChannel
from scheduler_service.executor_discovery import ExecutorTarget
from shared.speculative_config import SpeculativeConfig
from shared.scheduler_identity import PROCESS_SCHEDULER_ID
from shared.tls import check_server_files
from shared.setting import setting

PREEMPTION_MODES = ("auto", "recompute", "swap")
PLACEMENT_POLICIES = ("cache-aware", "round-robin")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Flags follow vLLM's names where one exists; each field's help text is its documentation.

    Validated on construction: settings that can never work together raise ValueError naming the flag.
    """

    executor_addresses: tuple[str, ...] = setting(
        help="an executor to drive; repeat for more; dns:///NAME:PORT drives every address NAME resolves to "
        "(re-resolved every few seconds)",
        flag="--executor", metavar="HOST:PORT",
    )
    host: str = setting("127.0.0.1", help="address the public gRPC API listens on")
    port: int = setting(50051, help="port of the public gRPC API (pagewire.v1.Generation)")
    max_num_seqs: int = setting(256, help="most sequences in one step (lowered to the executor's limit)")
    max_num_batched_tokens: int = setting(
        2048, help="most tokens in one step, prefill chunks and decodes together (at least --max-num-seqs)"
    )
    max_model_len: int | None = setting(
        None, help="longest prompt + completion in tokens", default_text="the executor's (the model's)"
    )
    max_queued_requests: int = setting(1024,
        help="waiting requests beyond which new ones get RESOURCE_EXHAUSTED")
    preemption_mode: str = setting(
        "auto", choices=PREEMPTION_MODES,
        help="how a preempted request leaves the device; auto picks swap or recompute by measured cost",
    )
    enable_prefix_caching: bool = setting(True,
        help="share the KV blocks of common prompt prefixes between requests")
    tokenizer_dir: str | None = setting(
        None, flag="--tokenizer", help="tokenizer directory or GGUF file", default_text="the executor's model"
    )
    reconnect_grace_seconds: float = setting(
        10.0, help="how long requests of a lost executor wait for a ready one (it or another) before they fail "
        "with UNAVAILABLE",
    )
    dns_refresh_seconds: float = setting(5.0, help="how often dns:///NAME:PORT executors are resolved again")
    placement_policy: str = setting(
        "cache-aware", choices=PLACEMENT_POLICIES,
        help="which executor a new request goes to: cache-aware (its longest exact prefix-cache hit, weighed "
        "against load) or round-robin (each in turn, skipping one whose free blocks cannot hold the prompt)",
    )
    max_plans_in_flight: int = setting(
        2, help="plans sent ahead of their results (1: no overlap between scheduling and the forward)"
    )
    http_port: int = setting(8000,
        help="port of the OpenAI-compatible HTTP API and /metrics, same host (0: off)")
    api_key: str | None = setting(
        None, help="require `Authorization: Bearer KEY` on HTTP and as gRPC metadata (env PAGEWIRE_API_KEY)",
        default_text="none, open",
    )
    served_model_name: str | None = setting(
        None, help="model name the HTTP API reports and accepts", default_text="the checkpoint's name"
    )
    enable_lora: bool = setting(False, help="serve LoRA adapters (GenerateRequest.adapter, the OpenAI `model` "
        "field); the executor needs it too (`pagewire serve` passes it on)")
    lora_modules: tuple[str, ...] = setting(
        (), many=True, metavar="NAME=PATH", help="PEFT LoRA adapters to load at start, e.g. a=/path/a b=/path/b "
        "(more at runtime: LoadAdapter, POST /v1/load_lora_adapter); needs --enable-lora",
        default_text="none",
    )
    tls_cert: str | None = setting(
        None, metavar="PEM", help="serve the public gRPC and HTTP APIs over TLS with this certificate (chain)",
        default_text="plaintext",
    )
    tls_key: str | None = setting(None, metavar="PEM", help="the private key of --tls-cert", default_text="none")
    tls_client_ca: str | None = setting(
        None, metavar="PEM", help="mutual TLS: accept only clients whose certificate this CA signed",
        default_text="any client",
    )
    executor_token: str | None = setting(
        None, help="the secret the executors require (their --executor-token; env PAGEWIRE_EXECUTOR_TOKEN), sent "
        "as `authorization: Bearer TOKEN` on Describe and Step", default_text="none; `pagewire serve`: random",
    )
    executor_tls_ca: str | None = setting(
        None, metavar="PEM", help="reach the executors over TLS, trusting this CA for their certificates "
        "(their --tls-cert)", default_text="plaintext",
    )
    executor_tls_client_cert: str | None = setting(
        None, metavar="PEM", help="mutual TLS to the executors: this scheduler's certificate (for an executor with "
        "--tls-client-ca)", default_text="none",
    )
    executor_tls_client_key: str | None = setting(
        None, metavar="PEM", help="the private key of --executor-tls-client-cert", default_text="none",
    )
    executor_tls_server_name: str | None = setting(
        None, metavar="NAME", help="the name the executors' certificates must carry, when it is not the host "
        "dialled (executors addressed by IP, or by a DNS name the certificate lacks)", default_text="the host dialled",
    )
    speculative_config: str | None = setting(
        None, metavar="JSON", help='speculative decoding, as vLLM spells it: \'{"method": "ngram", '
        '"num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}\' (drafts proposed here '
        "from each request's own tokens) or '{\"method\": \"draft_model\", \"model\": DIR, "
        "\"num_speculative_tokens\": 4}' (drafts proposed by the executors' draft model: give them the same "
        "flag); verified in the target forward, the tokens do not change; plans are then sent one at a time",
        default_text="off",
    )
    scheduler_id: str = setting(
        PROCESS_SCHEDULER_ID, help="this scheduler's name to its executors: each serves one scheduler id at a "
        "time, and a restarted scheduler with the same id reclaims its executors at once",
        default_text="random per process",
    )

    def executor_channel(self) -> ExecutorChannel:
        """How to reach the executors; reads the --executor-tls-* files, so the engine calls it once at start
        and shares the value with every replica."""
        return ExecutorChannel.of(self.executor_tls_ca, self.executor_tls_client_cert, self.executor_tls_client_key,
                                  self.executor_tls_server_name)

    @property
    def speculative(self) -> SpeculativeConfig | None:
        return None if self.speculative_config is None else SpeculativeConfig.parse(self.speculative_config)

    def __post_init__(self) -> None:
        if isinstance(self.executor_addresses, str):
            object.__setattr__(self, "executor_addresses", (self.executor_addresses,))
        if not self.executor_addresses:
            raise ValueError("give at least one --executor HOST:PORT (or dns:///NAME:PORT)")
        for target in self.executor_addresses:
            ExecutorTarget.parse(target)
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_queued_requests", "max_plans_in_flight"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"--max-model-len must be at least 1, got {self.max_model_len}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"--max-num-batched-tokens {self.max_num_batched_tokens} is below --max-num-seqs "
                f"{self.max_num_seqs}: every running sequence must be able to decode in every step; raise "
                "--max-num-batched-tokens or lower --max-num-seqs"
            )
        if self.placement_policy not in PLACEMENT_POLICIES:
            raise ValueError(f"--placement-policy must be cache-aware or round-robin, got {self.placement_policy!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(
                f"--preemption-mode must be auto, recompute or swap, got {self.preemption_mode!r}"
            )
        if not 0 <= self.http_port <= 65535 or not 0 <= self.port <= 65535:
            raise ValueError(
                f"ports must be in 0..65535, got --port {self.port} --http-port {self.http_port}"
            )
        if self.dns_refresh_seconds <= 0:
            raise ValueError(f"--dns-refresh-seconds must be > 0, got {self.dns_refresh_seconds}")
        for module in self.lora_modules:
            name, _, path = module.partition("=")
            if not name or not path:
                raise ValueError(f"--lora-modules takes NAME=PATH entries, got {module!r}")
        if self.lora_modules and not self.enable_lora:
            raise ValueError("--lora-modules needs --enable-lora")
        if self.speculative_config is not None:
            SpeculativeConfig.parse(self.speculative_config)
        check_server_files(self.tls_cert, self.tls_key, self.tls_client_ca)
        self.executor_channel()  # checks the --executor-tls-* files and their combination, at start-up
        if not self.scheduler_id:
            raise ValueError("--scheduler-id must not be empty")
        if self.reconnect_grace_seconds < 0:
            raise ValueError(f"--reconnect-grace-seconds must be >= 0, got {self.reconnect_grace_seconds}")
