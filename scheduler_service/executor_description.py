"""What the scheduler knows of its executor, read once from `Describe`."""

from __future__ import annotations

from dataclasses import dataclass

from scheduler_service.lora.adapter_files import LoraModelShape
from scheduler_service.preemption_policy import TransferSpeeds
from shared.pb.pagewire.v1 import executor_pb2 as pb


@dataclass(frozen=True, slots=True)
class ExecutorDescription:
    model_name: str
    model_path: str
    architecture: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    block_size: int
    num_device_blocks: int
    num_host_blocks: int
    bytes_per_block: int
    swap_out_bytes_per_second: float
    swap_in_bytes_per_second: float
    prefill_tokens_per_second: float
    device: str
    max_num_batched_tokens: int
    max_num_seqs: int
    max_logprobs: int
    lora_shape: LoraModelShape
    # LoRA slots on the executor (0: LoRA off) and the largest rank one holds.
    max_loras: int = 0
    max_lora_rank: int = 0
    fingerprint: str = ""
    # Most model drafts a plan may ask for per sequence (0: the executor has no draft model).
    max_model_drafts: int = 0

    @classmethod
    def from_pb(cls, message: pb.ExecutorDescription) -> ExecutorDescription:
        return cls(
            model_name=message.model.name,
            model_path=message.model.path,
            architecture=message.model.architecture,
            vocab_size=message.model.vocab_size,
            max_model_len=message.model.max_position_embeddings,
            eos_token_ids=tuple(message.model.eos_token_ids),
            block_size=message.cache.block_size,
            num_device_blocks=message.cache.num_device_blocks,
            num_host_blocks=message.cache.num_host_blocks,
            bytes_per_block=message.cache.bytes_per_block,
            swap_out_bytes_per_second=message.speeds.swap_out_bytes_per_second,
            swap_in_bytes_per_second=message.speeds.swap_in_bytes_per_second,
            prefill_tokens_per_second=message.speeds.prefill_tokens_per_second,
            device=message.device,
            max_num_batched_tokens=message.max_num_batched_tokens,
            max_num_seqs=message.max_num_seqs,
            max_logprobs=message.max_logprobs,
            lora_shape=LoraModelShape(
                num_layers=message.model.num_layers,
                hidden_size=message.model.hidden_size,
                intermediate_size=message.model.intermediate_size,
                q_size=message.model.num_attention_heads * message.model.head_dim,
                kv_size=message.model.num_kv_heads * message.model.head_dim,
            ),
            max_loras=message.max_loras,
            max_lora_rank=message.max_lora_rank,
            fingerprint=message.model.fingerprint,
            max_model_drafts=message.draft_model.max_model_drafts if message.HasField("draft_model") else 0,
        )

    @property
    def transfer_speeds(self) -> TransferSpeeds:
        return TransferSpeeds(
            bytes_per_block=self.bytes_per_block,
            swap_out_bytes_per_second=self.swap_out_bytes_per_second,
            swap_in_bytes_per_second=self.swap_in_bytes_per_second,
            prefill_tokens_per_second=self.prefill_tokens_per_second,
        )

    def same_cache_geometry(self, other: ExecutorDescription) -> bool:
        def geometry(d: ExecutorDescription) -> tuple[object, ...]:
            return (
                d.block_size, d.num_device_blocks, d.num_host_blocks, d.vocab_size, d.model_path, d.max_loras,
                d.fingerprint, d.max_model_drafts,
            )

        return geometry(self) == geometry(other)
