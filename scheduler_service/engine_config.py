"""Start-up configuration of the scheduler service, as given on the command line."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Flags follow vLLM's names where one exists. `max_model_len=None` takes the executor's.

    `preemption_mode` auto chooses swap or recompute per preempted request from the executor's
    measured speeds; `enable_prefix_caching` shares the KV of common prompt prefixes between requests.
    `max_plans_in_flight` > 1 sends the next plan before the previous result arrives (overlap
    scheduling), hiding the scheduler's work and the round trip behind the executor's forward; 1
    alternates strictly.
    """

    executor_address: str
    host: str = "127.0.0.1"
    port: int = 50051
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    max_queued_requests: int = 1024
    preemption_mode: str = "auto"
    enable_prefix_caching: bool = True
    tokenizer_dir: str | None = None
    # How long a lost executor may take to come back before live requests fail with UNAVAILABLE.
    reconnect_grace_seconds: float = 10.0
    max_plans_in_flight: int = 2
    # The OpenAI-compatible HTTP API (and /metrics) on this port, same host; 0 turns it off.
    http_port: int = 8000
    # When set, HTTP needs `Authorization: Bearer KEY` and the public gRPC API the same metadata.
    api_key: str | None = None
    # The model name the HTTP API reports and accepts; None takes the checkpoint's name.
    served_model_name: str | None = None

    def __post_init__(self) -> None:
        if self.max_queued_requests < 1:
            raise ValueError(f"--max-queued-requests must be at least 1, got {self.max_queued_requests}")
        if self.max_plans_in_flight < 1:
            raise ValueError(f"--max-plans-in-flight must be at least 1, got {self.max_plans_in_flight}")
        if self.preemption_mode not in ("auto", "recompute", "swap"):
            raise ValueError(f"--preemption-mode must be auto, recompute or swap, got {self.preemption_mode!r}")
