"""Multi-LoRA on the executor: PEFT adapter reading, a host cache, stacked device slots, the per-step delta."""
