"""LoRA facts both services share: what an adapter directory must hold and which projections it may target (torch-free)."""
